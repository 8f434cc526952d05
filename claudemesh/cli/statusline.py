"""
C{claudemesh statusline}: the command for Claude Code's C{statusLine}
setting. Claude Code runs it after each change in the session with its
status JSON on stdin and shows the first line it prints, so it must be
fast: it asks the MCP server of its own session over the local socket
(L{claudemesh.mcpserver.local}) for one line like C{team · 3 online · ✉ 2}
(the meshes, the peers online, the messages the model was not given yet)
and prints it. No broker round trip.

Without an answer (no MCP server in this session, or not yet) it prints
the joined meshes and C{offline}. It always exits 0. Standard library only.
"""

import os
import sys

from claudemesh.cli import hook
from claudemesh.mcpserver import local


def offline_line(environ):
    slugs = [m[4] for m in hook.joined_meshes(environ, with_names=True)]
    if not slugs:
        return "claudemesh · not joined"
    return "%s · offline" % (", ".join(slugs),)


def main(argv, environ=None):
    environ = os.environ if environ is None else environ
    try:
        # Claude Code's JSON is read so that it never blocks on a full pipe;
        # the line does not depend on it.
        hook.read_stdin()
        answer = local.ask(local.socket_path(environ, local.claude_code_pid()),
                           {"op": "statusline"})
        line = answer.get("line") if answer else None
        if not isinstance(line, str) or not line:
            line = offline_line(environ)
        sys.stdout.write(line.replace("\n", " ") + "\n")
        sys.stdout.flush()
    except BaseException as e:  # a status line never fails loudly
        if hook._debug_enabled(environ):
            sys.stderr.write("[claudemesh statusline] %s: %s\n" % (type(e).__name__, e))
    return 0
