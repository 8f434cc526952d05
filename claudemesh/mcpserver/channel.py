"""
The one adapter for Claude Code's channel notification.

Claude Code (started with C{--dangerously-load-development-channels
server:claudemesh}) shows a JSON-RPC notification
C{notifications/claude/channel} with params C{{content, meta}} to the model
as it arrives, when the server declared the capability
C{experimental: {"claude/channel": {}}}. It drops a notification whose
C{meta} has any value that is not a string.

The MCP SDK's server notifications are a closed set of typed models; this
module is the only place that sends one outside it. L{channel_params}
shapes the params (strings only), L{ChannelNotification} is the typed
model, and L{send_channel} hands it to the SDK session's public
C{send_notification}, which writes it on the connection's channel.
"""

import json
from typing import Any, Literal

import mcp_types

CHANNEL_METHOD = "notifications/claude/channel"
CHANNEL_CAPABILITY = "claude/channel"
EXPERIMENTAL_CAPABILITIES = {CHANNEL_CAPABILITY: {}}


class ChannelNotification(
        mcp_types.Notification[dict[str, Any], Literal["notifications/claude/channel"]]):
    """
    C{notifications/claude/channel}: not in the SDK's set of server
    notifications, hence this model.
    """


def _text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def channel_params(content, meta=None):
    """
    The params of a channel notification: C{content} as text and every
    C{meta} value as a string (numbers and booleans spelled out, lists and
    objects as JSON; C{None} values left out). Meta keys must be strings.
    """
    shaped = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str):
            raise TypeError("meta keys must be strings, not %r" % (key,))
        if value is not None:
            shaped[key] = _text(value)
    return {"content": _text(content), "meta": shaped}


def channel_notification(content, meta=None):
    return ChannelNotification(method=CHANNEL_METHOD, params=channel_params(content, meta))


async def send_channel(session, content, meta=None):
    """
    Send C{content} with C{meta} to Claude Code through C{session} (the
    SDK's L{mcp.server.session.ServerSession} of the connection).
    """
    await session.send_notification(channel_notification(content, meta))
