"""
The C{claudemesh} console script.

Only C{--version} and C{--help} exist so far; the commands (join, new, send,
launch, the MCP server...) arrive with the client issue.

Exit codes: 0 success, 3 bad arguments.
"""

import argparse
import sys

from claudemesh import __version__

EXIT_OK = 0
EXIT_BAD_ARGUMENTS = 3


class _BadArguments(Exception):
    """
    The command line could not be understood.
    """


class _ArgumentParser(argparse.ArgumentParser):
    """
    An L{argparse.ArgumentParser} whose errors exit with 3, not argparse's 2
    (2 is what the client uses for a terminal refusal by the broker).
    """

    def error(self, message):
        raise _BadArguments(message)


def _make_parser():
    parser = _ArgumentParser(
        prog="claudemesh",
        description=(
            "Talk to other Claude Code sessions and people through a claudemesh broker, "
            "end-to-end encrypted."
        ),
        epilog=(
            "This release contains the broker (twistd claudemesh-broker); the client "
            "commands arrive in a later release."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"claudemesh {__version__}"
    )
    parser.add_argument("command", nargs="?", help="(none yet)")
    return parser


def main(argv=None):
    """
    Run the command line.

    @param argv: the arguments without the program name; C{sys.argv[1:]}
        when C{None}.
    @return: the exit code.
    """
    parser = _make_parser()
    try:
        arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except _BadArguments as e:
        parser.print_usage(sys.stderr)
        print(f"claudemesh: error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except SystemExit as e:
        # --help and --version print and "exit"; report it as a return code
        # so callers (and tests) need not catch SystemExit.
        return EXIT_OK if e.code is None else e.code
    if arguments.command is not None:
        print(
            f"claudemesh: unknown command {arguments.command!r}: the client commands "
            "arrive in a later release",
            file=sys.stderr,
        )
        return EXIT_BAD_ARGUMENTS
    parser.print_help()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
