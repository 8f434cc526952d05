"""The claudemesh broker: core domain, WebSocket protocol, web resources and twistd wiring."""
