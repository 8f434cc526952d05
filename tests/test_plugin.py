"""
Tests for the twistd dropin C{twisted/plugins/claudemesh_broker.py}: it is
found in-process, and the installed C{twistd} finds it from any directory.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from claudemesh.broker import tap


def twistd_command():
    """
    The command that runs the C{twistd} of the interpreter running the tests:
    the script next to it (a virtualenv's bin/), else the module.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class PluginDiscoveryTests(SynchronousTestCase):
    """
    The dropin as Twisted's plugin system sees it.
    """

    def test_serviceMakerFound(self):
        """getPlugins(IServiceMaker) yields claudemesh-broker, pointing at the tap module."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("claudemesh-broker", makers)
        maker = makers["claudemesh-broker"]
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)


class TwistdSubprocessTests(SynchronousTestCase):
    """
    The real C{twistd} in a subprocess, started from an empty directory
    outside the repository (so only the installed package can be found).
    """

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="claudemesh-plugin-test-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def twistd(self, *args):
        """
        Run twistd with C{args}; return the completed process (text output).
        """
        environ = {
            name: value
            for name, value in os.environ.items()
            # The installed package must be found without help, and no
            # option may leak in from the environment of the test run.
            if name != "PYTHONPATH" and not name.startswith(("CLAUDEMESH_", "BROKER_"))
            and name not in ("DATABASE_URL", "MAX_MESSAGE_BYTES")
        }
        return subprocess.run(
            twistd_command() + list(args),
            cwd=self.directory,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def test_listedByTwistdHelp(self):
        """twistd --help lists claudemesh-broker."""
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("claudemesh-broker", result.stdout)

    def test_subcommandHelp(self):
        """twistd claudemesh-broker --help exits 0 and documents --database-url."""
        result = self.twistd("claudemesh-broker", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--database-url", result.stdout)
        self.assertIn("--trusted-proxy", result.stdout)

    def test_badValueIsAUsageError(self):
        """A bad option value exits non-zero with a usage message, not a traceback."""
        result = self.twistd("claudemesh-broker", "--max-message-bytes=nope")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--max-message-bytes", output)
        self.assertIn("'nope'", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(os.listdir(self.directory), [], "nothing was created")
