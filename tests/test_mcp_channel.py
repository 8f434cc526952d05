"""
The channel notification adapter (L{claudemesh.mcpserver.channel}): the
params it builds, and the exact JSON-RPC line the MCP SDK writes for it when
a real SDK server sends it over in-memory streams (on a private asyncio
loop; no Twisted reactor).
"""

import asyncio

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.shared.message import SessionMessage
from twisted.trial.unittest import SynchronousTestCase

from claudemesh.mcpserver import channel


class ChannelParamsTests(SynchronousTestCase):
    """
    channel_params / channel_notification shape what Claude Code accepts.
    """

    def test_meta_values_become_strings(self):
        """Numbers, booleans and objects in meta are spelled as strings; None values are dropped."""
        params = channel.channel_params("hi", {"a": 1, "b": None, "c": {"x": [1]}, "d": True,
                                               "e": "text", "f": 2.5})
        self.assertEqual(params, {"content": "hi", "meta": {
            "a": "1", "c": '{"x":[1]}', "d": "true", "e": "text", "f": "2.5"}})
        self.assertTrue(all(isinstance(v, str) for v in params["meta"].values()))

    def test_no_meta(self):
        """Without meta the params still carry an empty meta object."""
        self.assertEqual(channel.channel_params("x"), {"content": "x", "meta": {}})

    def test_non_string_keys_refused(self):
        """A meta key that is not a string is a programming error, refused."""
        self.assertRaises(TypeError, channel.channel_params, "x", {1: "a"})

    def test_notification_dump(self):
        """The typed model dumps to the method and params Claude Code expects."""
        note = channel.channel_notification("hello", {"from_name": "bob"})
        self.assertEqual(note.model_dump(by_alias=True, mode="json", exclude_none=True), {
            "method": "notifications/claude/channel",
            "params": {"content": "hello", "meta": {"from_name": "bob"}}})

    def test_capability(self):
        """The experimental capability is exactly {"claude/channel": {}}."""
        self.assertEqual(channel.EXPERIMENTAL_CAPABILITIES, {"claude/channel": {}})


class ChannelThroughSDKTests(SynchronousTestCase):
    """
    send_channel on a real SDK server session writes the raw notification.
    """

    def test_sdk_writes_the_notification(self):
        """After initialize, send_channel writes one notifications/claude/channel message."""
        wire = asyncio.run(self.exchange())
        notes = [m for m in wire if m.get("method") == "notifications/claude/channel"]
        self.assertEqual(notes, [{"jsonrpc": "2.0", "method": "notifications/claude/channel",
                                  "params": {"content": "bob: hi",
                                             "meta": {"from_name": "bob", "seq": "3"}}}])
        init = [m for m in wire if m.get("id") == 1][0]
        self.assertEqual(init["result"]["capabilities"]["experimental"],
                         {"claude/channel": {}})

    async def exchange(self):
        sent = asyncio.Event()

        async def initialized(ctx, params):
            await channel.send_channel(ctx.session, "bob: hi", {"from_name": "bob", "seq": 3})
            sent.set()

        server = Server("t", version="0")
        server.add_notification_handler("notifications/initialized", types.NotificationParams,
                                        initialized)
        options = server.create_initialization_options(
            experimental_capabilities=channel.EXPERIMENTAL_CAPABILITIES)
        to_server_send, to_server_receive = anyio.create_memory_object_stream(10)
        from_server_send, from_server_receive = anyio.create_memory_object_stream(10)
        wire = []

        def message(obj):
            return SessionMessage(types.jsonrpc_message_adapter.validate_python(obj))

        async with anyio.create_task_group() as tg:
            tg.start_soon(server.run, to_server_receive, from_server_send, options)
            await to_server_send.send(message({
                "jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "0"}}}))
            await to_server_send.send(message({"jsonrpc": "2.0",
                                               "method": "notifications/initialized"}))
            with anyio.fail_after(10):
                while len(wire) < 2:
                    out = await from_server_receive.receive()
                    wire.append(out.message.model_dump(by_alias=True, mode="json",
                                                       exclude_unset=True))
                await sent.wait()
            await to_server_send.aclose()
        return wire
