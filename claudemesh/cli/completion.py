"""
C{claudemesh completion bash|zsh}: a completion script generated from the
command line's own parser by shtab, so it can never list a command or flag
the parser does not have.

Install it with::

    claudemesh completion bash > ~/.local/share/bash-completion/completions/claudemesh
    claudemesh completion zsh > "${fpath[1]}/_claudemesh"
"""

import sys

from claudemesh.cli.exitcodes import EXIT_OK


def script(parser, shell):
    """
    The completion script for C{shell} (C{bash} or C{zsh}) as text.
    """
    import shtab

    return shtab.complete(parser, shell=shell)


def run(parser, shell):
    sys.stdout.write(script(parser, shell))
    sys.stdout.flush()
    return EXIT_OK
