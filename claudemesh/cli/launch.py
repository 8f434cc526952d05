"""
C{claudemesh launch [--mesh S] [--name N] [--mode M] [-- claude args…]}, and
a bare C{claudemesh}: start Claude Code as a session of your mesh.

It mints a session UUID and replaces itself (C{exec}) with
C{claude --dangerously-load-development-channels=server:claudemesh
--session-id <uuid> [claude args…]}, with C{CLAUDEMESH_SESSION_ID} and
C{CLAUDEMESH_DISPLAY_NAME} (and C{CLAUDEMESH_MESH} / C{CLAUDEMESH_MESSAGE_MODE}
when chosen) in its environment, so the MCP server Claude Code starts uses
that session id and the status hooks find it. Exiting is claude's: the exit
status and signals are its own, since it is the same process.

With C{--resume}/C{--continue} (or C{-r}/C{-c}) among claude's arguments no
session id is minted: claude picks the session, and the MCP server falls
back to its own session id (docs/protocol.md, sessions and presence).

The channels option takes several values: given as a separate word it
would swallow the next argument (C{claudemesh launch -- "hello" -c -p} made
"hello" a channel name), so it is always passed in its C{=} form.
"""

import os
import shutil
import sys
import uuid

from claudemesh.cli.exitcodes import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_OK

CHANNELS_FLAG = "--dangerously-load-development-channels"
CHANNEL = "server:claudemesh"
RESUME_FLAGS = ("--resume", "-r", "--continue", "-c")
NOT_FOUND = "✗ `claude` not found on PATH. Install Claude Code first."
JOIN_HINT = ("Join a mesh first: claudemesh join '<invite link>'  (or create one: "
             "claudemesh new <name>), then run claudemesh again.")


def err(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def find_claude(environ):
    """
    The C{claude} executable: on C{PATH}, else where its installer puts it.
    """
    found = shutil.which("claude", path=environ.get("PATH", os.defpath))
    if found:
        return found
    home = environ.get("HOME") or os.path.expanduser("~")
    for candidate in (os.path.join(home, ".local", "bin", "claude"),
                      os.path.join(home, ".claude", "local", "claude")):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _passthrough(claude_args):
    args = list(claude_args or [])
    if args[:1] == ["--"]:
        args = args[1:]
    kept, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == CHANNELS_FLAG:
            skip = True  # ours is already there
            continue
        if arg.startswith(CHANNELS_FLAG + "="):
            continue
        kept.append(arg)
    return kept


def claude_command(claude, session_id, claude_args):
    """
    The argv for claude; C{session_id} C{None} when the user resumes.
    """
    argv = [claude, "%s=%s" % (CHANNELS_FLAG, CHANNEL)]
    if session_id:
        argv += ["--session-id", session_id]
    return argv + _passthrough(claude_args)


def resumes(claude_args):
    return any(a in RESUME_FLAGS or a.startswith("--resume=") for a in _passthrough(claude_args))


def prepare(arguments, environ):
    """
    C{(argv, env, banner lines)} for claude, or raise L{LaunchError}.
    """
    from claudemesh.cli.session import default_display_name
    from claudemesh.client import config as configuration

    directory = configuration.config_dir(environ)
    try:
        config = configuration.load(directory)
    except configuration.ConfigError as e:
        raise LaunchError("claudemesh: %s" % (e,), EXIT_FAILURE) from None
    if not config.meshes:
        raise LaunchError("claudemesh: No meshes joined. " + JOIN_HINT, EXIT_FAILURE)
    slug = getattr(arguments, "mesh", None)
    if slug:
        entry = config.find(slug)
        if entry is None:
            raise LaunchError('claudemesh: Mesh "%s" not found. Joined: %s'
                              % (slug, ", ".join(m.slug for m in config.meshes)), EXIT_FAILURE)
        meshes = [entry]
    else:
        meshes = list(config.meshes)
    name = getattr(arguments, "name", None) or (
        meshes[0].displayName if len(meshes) == 1 else None) or \
        default_display_name(environ)
    claude = find_claude(environ)
    if claude is None:
        raise LaunchError(NOT_FOUND, EXIT_NOT_FOUND)
    claude_args = getattr(arguments, "claude_args", None) or []
    session_id = None if resumes(claude_args) else str(uuid.uuid4())
    env = dict(environ)
    env["CLAUDEMESH_DISPLAY_NAME"] = name
    env.pop("CLAUDEMESH_SESSION_ID", None)
    if session_id:
        env["CLAUDEMESH_SESSION_ID"] = session_id
    if slug:
        env["CLAUDEMESH_MESH"] = slug
    mode = getattr(arguments, "mode", None)
    if mode:
        env["CLAUDEMESH_MESSAGE_MODE"] = mode
    env.setdefault("CLAUDEMESH_CONFIG_DIR", directory)
    banner = ["claudemesh launch — as %s on %s%s" % (
        name, ", ".join(m.slug for m in meshes), " [%s]" % (mode,) if mode else ""),
        "session %s" % (session_id or "(resumed: claude picks it)",)]
    return claude_command(claude, session_id, claude_args), env, banner


class LaunchError(Exception):
    def __init__(self, message, code):
        Exception.__init__(self, message)
        self.message = message
        self.code = code


def run(arguments, environ, execve=os.execve):
    """
    Replace this process with claude; returns an exit code only when it
    could not.
    """
    try:
        argv, env, banner = prepare(arguments, environ)
    except LaunchError as e:
        err(e.message)
        return e.code
    if not registered(environ):
        err("claudemesh: the MCP server is not registered with Claude Code yet: run "
            "'claudemesh install' (Claude Code will not connect to the mesh without it).")
    for line in banner:
        err(line)
    sys.stdout.flush()
    try:
        execve(argv[0], argv, env)
    except OSError as e:
        err("✗ cannot run %s: %s" % (argv[0], e.strerror or e))
        return EXIT_NOT_FOUND
    return EXIT_OK  # only reached with a test's execve


def registered(environ):
    """
    Is the MCP server registered in C{~/.claude.json}?
    """
    from claudemesh.cli import install

    try:
        return install.mcp_registered(environ)
    except Exception:
        return False


def bare(parser, environ):
    """
    C{claudemesh} alone: launch when a mesh is joined, else the help and
    how to join.
    """
    from claudemesh.client import config as configuration

    try:
        config = configuration.load(configuration.config_dir(environ))
    except configuration.ConfigError as e:
        err("claudemesh: %s" % (e,))
        return EXIT_FAILURE
    if not config.meshes:
        parser.print_help()
        print()
        print(JOIN_HINT)
        return EXIT_OK

    class Defaults:
        mesh = None
        name = None
        mode = None
        claude_args = []

    return run(Defaults(), environ)
