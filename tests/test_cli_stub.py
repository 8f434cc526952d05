"""
Tests for the placeholder C{claudemesh} console script
(L{claudemesh.cli.main}).
"""

import io
import sys

from twisted.trial.unittest import SynchronousTestCase

from claudemesh import __version__
from claudemesh.cli.main import main


class CommandLineStubTests(SynchronousTestCase):
    """
    C{claudemesh --version}, C{--help} and bad arguments.
    """

    def run_main(self, argv):
        """
        Run L{main} with captured output; return C{(code, stdout, stderr)}.
        """
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(argv)
        return code, out.getvalue(), err.getvalue()

    def test_version(self):
        """--version prints 'claudemesh <version>' and exits 0."""
        self.assertEqual(self.run_main(["--version"]),
                         (0, f"claudemesh {__version__}\n", ""))

    def test_help(self):
        """--help exits 0 and says the commands arrive in a later release."""
        code, out, err = self.run_main(["--help"])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("usage: claudemesh", out)
        self.assertIn("later release", " ".join(out.split()))

    def test_noArguments(self):
        """Without arguments the help is printed and the exit code is 0."""
        code, out, _ = self.run_main([])
        self.assertEqual(code, 0)
        self.assertIn("usage: claudemesh", out)

    def test_badOption(self):
        """An unknown option exits 3 with a usage message on stderr."""
        code, out, err = self.run_main(["--bogus"])
        self.assertEqual((code, out), (3, ""))
        self.assertIn("--bogus", err)
        self.assertIn("usage:", err)

    def test_unknownCommand(self):
        """A command name exits 3 and says commands arrive later."""
        code, _, err = self.run_main(["join"])
        self.assertEqual(code, 3)
        self.assertIn("later release", err)
