"""
The exit codes of the C{claudemesh} command, in one small module that every
part of the CLI imports (L{claudemesh.cli.main} only parses and dispatches,
so nothing has to import the entry point back).

The table is documented in docs/cli.md; a script may rely on it.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_AUTH = 2
EXIT_BAD_ARGUMENTS = 3
EXIT_NETWORK = 4
EXIT_NOT_FOUND = 5
# The message (or frame) is bigger than the broker accepts: retrying cannot
# help, unlike a network failure (4).
EXIT_TOO_LARGE = 6
EXIT_PERMISSION = 7
EXIT_INTERNAL = 8

SUMMARY = ("0 ok, 1 failure, 2 auth, 3 bad arguments, 4 network, 5 not found, "
           "6 message too large, 7 permission denied, 8 internal")
