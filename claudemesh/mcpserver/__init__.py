"""
The MCP server that connects a Claude Code session to its meshes
(C{claudemesh mcp}), and what it needs: the channel notification adapter,
transcript status inference, and the bridge between the MCP SDK (asyncio)
and the mesh client (Twisted).

The package is called C{mcpserver}, not C{mcp}, so that C{import mcp} always
means the official SDK. Importing this package imports nothing: the hook
command and the rest of the CLI must not pay for the SDK or Twisted.
"""
