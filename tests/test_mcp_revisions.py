"""
C{claudemesh mcp} under the MCP SDK's own client, on both protocol
revisions Claude Code may negotiate: the 2026-07-28 C{server/discover}
probe (the SDK client's C{auto} mode) and the C{initialize} handshake
(C{legacy}). Either way the server declares C{experimental:
{"claude/channel": {}}}; with channels as the live path (opted in, no
inbox socket) it makes the client fall back to C{initialize}. Each case
runs the server as a subprocess, on a private asyncio loop (no Twisted
reactor here).
"""

import asyncio
import os
import shutil
import tempfile

from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from twisted.trial.unittest import SynchronousTestCase

from tests.test_cli_commands import claudemesh_command

MODERN = "2026-07-28"


class RevisionTests(SynchronousTestCase):
    """
    The capability on whichever revision is negotiated.
    """

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="cm-rev-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def connect(self, mode, **extra):
        """
        C{(protocol version, experimental capabilities, tool names)} the SDK
        client sees.
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAUDEMESH_", "CLAUDE_CODE_"))}
        env.update(CLAUDEMESH_CONFIG_DIR=os.path.join(self.tmp, "config"),
                   CLAUDEMESH_RUNTIME_DIR=os.path.join(self.tmp, "run"),
                   HOME=self.tmp, **extra)
        command = claudemesh_command()
        params = StdioServerParameters(command=command[0], args=command[1:] + ["mcp"], env=env,
                                       cwd=self.tmp)

        async def session():
            async with asyncio.timeout(60):
                async with Client(params, mode=mode) as client:
                    tools = await client.list_tools()
                    return (client.protocol_version, client.server_capabilities.experimental,
                            sorted(t.name for t in tools.tools))

        return asyncio.run(session())

    def test_discover(self):
        """On the 2026-07-28 revision (server/discover) claude/channel is declared."""
        version, experimental, tools = self.connect("auto")
        self.assertEqual(version, MODERN)
        self.assertEqual(experimental, {"claude/channel": {}})
        self.assertIn("send_message", tools)

    def test_initialize(self):
        """On the initialize handshake claude/channel is declared."""
        version, experimental, tools = self.connect("legacy")
        self.assertNotEqual(version, MODERN)
        self.assertEqual(experimental, {"claude/channel": {}})
        self.assertIn("send_message", tools)

    def test_channels_make_the_client_fall_back(self):
        """Channels opted in, no inbox socket: discover is refused, the client uses initialize."""
        version, experimental, _ = self.connect("auto", CLAUDEMESH_CHANNELS="1")
        self.assertNotEqual(version, MODERN)
        self.assertEqual(experimental, {"claude/channel": {}})

    def test_inbox_socket_keeps_the_modern_revision(self):
        """With an inbox socket the channel is not needed: the probe is answered normally."""
        version, _, _ = self.connect("auto", CLAUDEMESH_CHANNELS="1",
                                     CLAUDE_CODE_MESSAGING_SOCKET=os.path.join(self.tmp, "s"))
        self.assertEqual(version, MODERN)
