"""
The broker's tunables as one value, built from the command line by
L{claudemesh.broker.tap} and handed to everything else.

A limit of 0 turns that limit off.
"""

import attr


@attr.s(frozen=True, slots=True, auto_attribs=True)
class BrokerSettings:
    status_ttl_seconds: int = 60
    hook_fresh_window_seconds: int = 30
    max_connections_per_mesh: int = 100
    max_message_bytes: int = 65536
    hook_rate_limit_per_min: int = 30
    send_rate_limit_per_min: int = 60
    send_rate_limit_burst: int = 10
    retention_days: int = 7
    max_connections_per_ip: int = 200
    hello_rate_per_ip: int = 20
    # Deadlines against connections that hold a slot without using it
    # (slowloris): complete request headers, then a successful hello.
    header_timeout_seconds: int = 10
    hello_timeout_seconds: int = 10
    trusted_proxies: tuple = ()
    # Not operator settings: fixed by the protocol (docs/protocol.md), kept
    # here so tests can shorten them.
    grace_seconds: int = 90
    lease_seconds: int = 30
    message_ttl_seconds: int = 7 * 24 * 3600
    auto_ping_interval: int = 30
    auto_ping_timeout: int = 75
    pending_hook_seconds: int = 10
    # Bytes a connection may queue past a full socket buffer before it is
    # closed as a slow consumer (4003).
    max_outbound_buffer_bytes: int = 1024 * 1024
