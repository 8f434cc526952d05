"""
The C{claudemesh} console script: argument parsing and running a command on
the reactor (L{twisted.internet.task.react}; the global reactor is imported
here, in the entry point, and nowhere else).

The exit codes live in L{claudemesh.cli.exitcodes}. Everything heavier than
the parser is imported lazily, per command, so that C{claudemesh hook} (run
on every prompt) stays fast.
"""

import argparse
import difflib
import os
import re
import sys

from claudemesh import __version__
from claudemesh.cli.exitcodes import EXIT_BAD_ARGUMENTS, EXIT_INTERNAL, EXIT_OK, SUMMARY

STATUSES = ("idle", "working", "dnd")
MIN_EXPIRES = 60
MAX_EXPIRES = 366 * 86400
_MESSAGE_ID = re.compile(r"\A[0-9a-fA-F-]{8,64}\Z")


class _BadArguments(Exception):
    """
    The command line could not be understood.

    @ivar parser: the parser that could not understand it (a sub-command's
        own, for a sub-command's arguments), whose usage line is the help.
    """

    def __init__(self, message, parser=None):
        Exception.__init__(self, message)
        self.parser = parser


class _ArgumentParser(argparse.ArgumentParser):
    """
    An L{argparse.ArgumentParser} whose errors exit with 3, not argparse's 2
    (2 is what the client uses for a terminal refusal by the broker), and
    that suggests the closest choice for a typo ("did you mean send?").
    """

    def error(self, message):
        raise _BadArguments(message, self)

    def _check_value(self, action, value):
        # argparse's own check, with a suggestion. (Python 3.14 has
        # suggest_on_error; this package supports 3.11.)
        if action.choices is None or value in action.choices:
            return
        choices = [str(c) for c in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        what = "command" if isinstance(action, argparse._SubParsersAction) else "choice"
        message = "unknown %s %r" % (what, value)
        if close:
            message += " — did you mean %s?" % (close[0],)
        elif what == "command":
            message += " (claudemesh --help lists the commands)"
        else:
            message += " (choose from %s)" % (", ".join(choices),)
        raise argparse.ArgumentError(action, message)


# name, one-line help, whether it connects to a broker (runs on the reactor)
COMMANDS = [
    ("new", "create a mesh on a broker and become its owner", True),
    ("invite", "make an invite link (and a QR code in a terminal)", True),
    ("invites", "list this mesh's invites, or revoke one with --revoke ID", True),
    ("join", "join a mesh with an invite link", True),
    ("list", "list the meshes joined on this machine", False),
    ("use", "make a mesh the default for every command (or --clear it)", False),
    ("leave", "leave a mesh (on the broker and in the local config)", True),
    ("whoami", "show your identity on each joined mesh", False),
    ("set-broker", "change the broker URL of a joined mesh (the broker moved)", True),
    ("role", "make a member an admin or a member (owner only)", True),
    ("members", "list every member of the mesh, offline ones too", True),
    ("peers", "list the sessions connected to the mesh", True),
    ("send", "send an end-to-end-encrypted message ('-' reads it from stdin)", True),
    ("inbox", "wait briefly and print the messages waiting for you", True),
    ("listen", "print messages as they arrive, until Ctrl-C", True),
    ("status", "set your status (idle, working, dnd), or show a sent message's status",
     True),
    ("summary", "set the one-line summary others see in 'peers'", True),
    ("join-group", "put your sessions in a @group (now and from now on)", True),
    ("leave-group", "take your sessions out of a @group", True),
    ("audit", "show (or --verify) the mesh's audit log (admins)", True),
    ("disconnect", "reset peers' connections; they reconnect by themselves", True),
    ("kick", "end peers' sessions; they can rejoin by running claudemesh", True),
    ("ban", "remove a member's access to the mesh (and rotate the mesh key)", True),
    ("rotate-key", "give the mesh a new key that removed members never get (admins)", True),
    ("unban", "restore a banned member's access", True),
    ("bans", "list banned members", True),
    ("launch", "start Claude Code on your mesh (what a bare 'claudemesh' does)", False),
    ("install", "register the MCP server and the status hooks with Claude Code", False),
    ("uninstall", "remove what 'claudemesh install' registered", False),
    ("doctor", "check config, keys, brokers, clock and the Claude Code setup", True),
    ("completion", "print a bash or zsh completion script for claudemesh", False),
    ("mcp", "the MCP server Claude Code runs (stdio; started by Claude Code)", False),
    ("ui", "a local web page to watch and steer a mesh (127.0.0.1 only)", False),
    ("hook", "report a session's status to the brokers (run by Claude Code hooks)", False),
    ("statusline", "one line for Claude Code's status line (run by Claude Code)", False),
]


def _add_global_flags(parser, suppress):
    """
    C{--mesh} and C{--json}, accepted before the command and after it. On
    the subcommands the defaults are suppressed, so a flag given before the
    command is not overwritten by the subcommand's default.
    """
    parser.add_argument(
        "--mesh", metavar="SLUG", default=argparse.SUPPRESS if suppress else None,
        help="the mesh to act on (default: $CLAUDEMESH_MESH, then 'claudemesh use', "
             "then the only one joined)")
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
        help="print JSON instead of text")


def make_parser():
    """
    The whole command line, as one L{argparse.ArgumentParser} (also the
    source of the shell completion scripts).
    """
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, suppress=True)
    parser = _ArgumentParser(
        prog="claudemesh",
        description=(
            "Talk to other Claude Code sessions and people through a claudemesh broker, "
            "end-to-end encrypted."
        ),
        epilog=(
            "Exit codes: %s. The broker itself runs as 'twistd -n claudemesh-broker'."
            % (SUMMARY,)
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"claudemesh {__version__}"
    )
    _add_global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_ArgumentParser)
    parsers = {}
    for name, help_text, _ in COMMANDS:
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text,
                                       parents=[common])
    p = parsers["new"]
    p.add_argument("mesh_name", metavar="mesh-name")
    p.add_argument("--name", help="your display name on the mesh (default: $USER)")
    p.add_argument("--broker", metavar="URL",
                   help="the broker's WebSocket URL, ws://host:port/ws "
                        "(default: $CLAUDEMESH_BROKER_URL or ws://localhost:7900/ws)")
    p.add_argument("--admin-token-file", metavar="FILE",
                   help="file holding the broker's admin token (or $CLAUDEMESH_ADMIN_TOKEN)")
    p = parsers["invite"]
    p.add_argument("--role", choices=("member", "admin"), default="member")
    p.add_argument("--uses", type=_positive_int, default=1, metavar="N",
                   help="how many people may join with it (default 1)")
    p.add_argument("--expires", type=_expiry, default=7 * 86400, metavar="DURATION",
                   help="validity from 1m to 366d, like 30m, 12h, 7d (default 7d)")
    parsers["invites"].add_argument(
        "--revoke", metavar="ID", help="revoke this invite (its id, or 8+ characters of it)")
    p = parsers["join"]
    p.add_argument("link", help="claudemesh://join/<token>#<key>")
    p.add_argument("--name", help="your display name on the mesh (default: the name you "
                                  "already have there, else $USER)")
    parsers["leave"].add_argument("mesh_slug", nargs="?", metavar="mesh",
                                  help="the mesh to leave")
    p = parsers["use"]
    p.add_argument("mesh_slug", nargs="?", metavar="mesh", help="the mesh to act on by default")
    p.add_argument("--clear", action="store_true", help="forget the default mesh")
    parsers["set-broker"].add_argument("url", help="the broker's new URL, ws[s]://host[:port]/ws")
    p = parsers["role"]
    p.add_argument("peer")
    p.add_argument("role", choices=("admin", "member", "owner"))
    p = parsers["send"]
    p.add_argument("to", help="display name, key prefix (8+ hex), '*' or @group")
    p.add_argument("message", nargs="+", help="the message, or '-' to read it from stdin")
    p.add_argument("--priority", choices=("now", "next", "low"), default="next")
    parsers["inbox"].add_argument("--wait", type=_seconds, default=2.0, metavar="SECONDS",
                                  help="how long to wait for messages (default 2)")
    p = parsers["status"]
    p.add_argument("status", metavar="idle|working|dnd|MESSAGE-ID",
                   help="a status to set, or the id 'send' printed to see who got it")
    p.add_argument("--session", metavar="ID", help="only this session of yours")
    p = parsers["summary"]
    p.add_argument("text", nargs="+")
    p.add_argument("--session", metavar="ID", help="only this session of yours")
    for verb in ("join-group", "leave-group"):
        p = parsers[verb]
        p.add_argument("group", help="the group, like devs or @devs or team/backend")
        p.add_argument("--session", metavar="ID", help="only this session of yours")
    parsers["join-group"].add_argument("--role", metavar="ROLE",
                                       help="your role in the group (free text, like lead)")
    p = parsers["audit"]
    p.add_argument("--verify", action="store_true", help="check the hash chain")
    p.add_argument("--limit", type=_positive_int, default=50, metavar="N")
    for verb in ("disconnect", "kick"):
        p = parsers[verb]
        p.add_argument("peer", nargs="?", help="display name or key prefix (8+ hex)")
        p.add_argument("--stale", type=_duration, metavar="DURATION",
                       help="every session silent for this long, like 30m")
        p.add_argument("--all", action="store_true", help="every session but yours")
    for verb in ("ban", "unban"):
        parsers[verb].add_argument("peer", help="display name or key prefix (8+ hex)")
    parsers["ban"].add_argument("--no-rotate", action="store_true",
                                help="keep the mesh key (the banned member can still read "
                                     "broadcasts sealed with it)")
    parsers["unban"].add_argument("--no-rotate", action="store_true",
                                  help="keep the mesh key made during the ban (the unbanned "
                                       "member cannot read broadcasts until a rotation)")
    parsers["rotate-key"].add_argument("--reason", metavar="TEXT",
                                       help="recorded in the audit log (default: manual)")
    p = parsers["launch"]
    p.add_argument("--name", help="your display name in this session")
    p.add_argument("--mode", choices=("push", "inbox", "off"),
                   help="how peer messages reach Claude: push (default), inbox or off")
    p.add_argument("claude_args", nargs=argparse.REMAINDER, metavar="-- claude args",
                   help="arguments passed on to claude after '--'")
    parsers["mcp"].add_argument("--mode", choices=("push", "inbox", "off"))
    parsers["install"].add_argument("--no-hooks", action="store_true",
                                    help="register the MCP server only")
    parsers["hook"].add_argument("status", nargs="?", help="idle, working or dnd")
    p = parsers["ui"]
    p.add_argument("--port", type=_port, default=0, metavar="P",
                   help="listen on this port of 127.0.0.1 (default: a free one)")
    p.add_argument("--no-open", action="store_true", help="print the URL, do not open a browser")
    parsers["completion"].add_argument("shell", choices=("bash", "zsh"))
    # Each command's own parser, whose usage line an argument error shows.
    parser.command_parsers = parsers
    return parser


def _port(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port number" % (text,)) from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is from 1 to 65535")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % (text,)) from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % (text,)) from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text):
    """
    C{90}, C{90s}, C{30m}, C{12h}, C{7d}, C{2w} → seconds.
    """
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        value = int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r is not a duration like 90s, 30m, 12h or 7d" % (text,)) from None
    if value < 1:
        raise argparse.ArgumentTypeError("a duration must be positive")
    if value > 10 * 366 * 86400:
        raise argparse.ArgumentTypeError("%r is longer than ten years" % (text,))
    return value * (unit or 1)


def _expiry(text):
    """
    An invite's validity: a L{_duration} from one minute to 366 days (what
    the broker accepts), refused here in the flag's own terms.
    """
    seconds = _duration(text)
    bare = text.strip()[-1:].isdigit()
    if seconds < MIN_EXPIRES:
        raise argparse.ArgumentTypeError(
            "%r is %d second%s; an invite lasts at least 1m (a number without a unit "
            "counts seconds: try 30m, 12h or 7d)" % (text, seconds, "" if seconds == 1 else "s")
            if bare else "%r is shorter than the minimum, 1m" % (text,))
    if seconds > MAX_EXPIRES:
        raise argparse.ArgumentTypeError("%r is longer than the maximum, 366d" % (text,))
    return seconds


def _check(arguments):
    """
    Argument rules argparse cannot say.
    """
    command = arguments.command
    if command in ("disconnect", "kick"):
        chosen = [arguments.peer is not None, arguments.stale is not None, arguments.all]
        if sum(chosen) != 1:
            raise _BadArguments("%s takes exactly one of <peer>, --stale DURATION, --all"
                                % (command,))
    if command == "leave" and arguments.mesh_slug and arguments.mesh \
            and arguments.mesh_slug != arguments.mesh:
        raise _BadArguments("leave: the mesh is given twice, differently")
    if command == "use" and arguments.clear and arguments.mesh_slug:
        raise _BadArguments("use takes a mesh or --clear, not both")
    if command == "status" and arguments.status not in STATUSES:
        if not _MESSAGE_ID.match(arguments.status):
            close = difflib.get_close_matches(arguments.status, STATUSES, n=1, cutoff=0.5)
            raise _BadArguments(
                "status: %r is not a status (idle, working, dnd) nor a message id%s"
                % (arguments.status, " — did you mean %s?" % (close[0],) if close else ""))
        if arguments.session:
            raise _BadArguments("status MESSAGE-ID takes no --session")
    if command == "send" and arguments.message == ["-"] and sys.stdin is None:
        raise _BadArguments("send: '-' reads the message from stdin, which is closed")


def main(argv=None):
    """
    Run the command line.

    @param argv: the arguments without the program name; C{sys.argv[1:]}
        when C{None}.
    @return: the exit code.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["hook"]:
        # Runs on every prompt: no parser, no Twisted (claudemesh.cli.hook).
        from claudemesh.cli import hook

        return hook.main(argv[1:])
    if argv[:1] == ["statusline"]:
        # Runs after every change in a session: as light as the hook.
        from claudemesh.cli import statusline

        return statusline.main(argv[1:])
    parser = make_parser()
    try:
        arguments = parser.parse_args(argv)
        try:
            _check(arguments)
        except _BadArguments as e:
            e.parser = parser.command_parsers.get(arguments.command)
            raise
    except _BadArguments as e:
        # "claudemesh send" missing its message shows send's usage, not the
        # whole command line's.
        (e.parser or parser).print_usage(sys.stderr)
        print(f"claudemesh: error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except SystemExit as e:
        # --help and --version print and "exit"; report it as a return code
        # so callers (and tests) need not catch SystemExit.
        return EXIT_OK if e.code is None else e.code
    if arguments.command is None:
        from claudemesh.cli import launch

        return launch.bare(parser, os.environ)
    if arguments.command == "mcp":
        # Installs the asyncio reactor itself, so nothing before this may
        # import twisted.internet.reactor. Exits the process.
        from claudemesh.mcpserver import server

        return server.main(os.environ, arguments.mesh, arguments.mode)
    if arguments.command == "launch":
        from claudemesh.cli import launch

        return launch.run(arguments, os.environ)
    if arguments.command == "ui":
        from claudemesh.webui import command

        return command.run(arguments, os.environ)
    if arguments.command in ("install", "uninstall"):
        from claudemesh.cli import install

        return install.run(arguments, os.environ)
    if arguments.command == "completion":
        from claudemesh.cli import completion

        return completion.run(parser, arguments.shell)
    from claudemesh.cli import commands

    connects = {name: network for name, _, network in COMMANDS}[arguments.command]
    if not connects:
        return commands.run_local(arguments, os.environ)
    from twisted.internet import task

    try:
        task.react(commands.run_networked, (arguments, os.environ))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_INTERNAL
    return EXIT_OK


def entry_point():
    """
    The console script: L{main}, quiet when its output is closed early
    (C{claudemesh peers | head -1}).
    """
    try:
        return main()
    except BrokenPipeError:
        # Python would print a traceback when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(entry_point())
