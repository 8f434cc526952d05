"""Client library: configuration, reconnecting WebSocket client, message encryption."""
