"""
The C{claudemesh} entry point in-process: help, version, argument errors
(exit 3) and the commands that need no broker (C{list}, C{whoami}).
"""

import io
import json
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from claudemesh import __version__
from claudemesh.cli.main import COMMANDS, main
from claudemesh.client import config
from tests.test_client_units import make_entry


class CommandLineTests(SynchronousTestCase):
    """
    Parsing, exit codes and the local commands.
    """

    def setUp(self):
        self.dir = os.path.join(self.mktemp(), "cfg")
        self.patch(os, "environ", dict(os.environ, CLAUDEMESH_CONFIG_DIR=self.dir))

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

    def test_help_lists_commands(self):
        """--help exits 0 and names every command with its one-line help."""
        code, out, err = self.run_main(["--help"])
        self.assertEqual((code, err), (0, ""))
        for name, help_text, _ in COMMANDS:
            self.assertIn(name, out)
            self.assertIn(help_text[:30], " ".join(out.split()))

    def test_no_arguments(self):
        """Without arguments the help is printed and the exit code is 0."""
        code, out, _ = self.run_main([])
        self.assertEqual(code, 0)
        self.assertIn("usage: claudemesh", out)

    def test_bad_arguments_exit_3(self):
        """Unknown options/commands, missing or contradictory arguments exit 3."""
        for argv in (["--bogus"], ["frobnicate"], ["send", "bob"], ["kick"],
                     ["kick", "bob", "--all"], ["invite", "--uses", "0"],
                     ["invite", "--expires", "soon"], ["status", "busy"]):
            code, out, err = self.run_main(argv)
            self.assertEqual((code, out), (3, ""), argv)
            self.assertIn("usage:", err)

    def test_bad_arguments_show_the_command_usage(self):
        """An argument error of a command shows that command's usage line, not the whole CLI's."""
        for argv, usage in ((["send", "bob"], "usage: claudemesh send "),
                            (["kick", "bob", "--all"], "usage: claudemesh kick "),
                            (["invite", "--uses", "0"], "usage: claudemesh invite "),
                            (["frobnicate"], "usage: claudemesh [-h]")):
            code, _, err = self.run_main(argv)
            self.assertEqual(code, 3, argv)
            self.assertTrue(err.startswith(usage), (argv, err))

    def test_list_empty(self):
        """'list' with no config says how to join, exit 0."""
        code, out, _ = self.run_main(["list"])
        self.assertEqual(code, 0)
        self.assertIn("No meshes joined", out)

    def test_list_and_whoami_json(self):
        """'list --json' and 'whoami --json' show the joined mesh; no secret is printed."""
        cfg = config.Config()
        entry = make_entry("team")
        cfg.put(entry)
        config.save(self.dir, cfg)
        code, out, _ = self.run_main(["list", "--json"])
        self.assertEqual((code, [m["slug"] for m in json.loads(out)]), (0, ["team"]))
        code, out, _ = self.run_main(["whoami", "--json"])
        self.assertEqual(code, 0)
        document = json.loads(out)
        self.assertEqual(document["meshes"][0]["pubkey"], entry.pubkey)
        self.assertNotIn(entry.secretKey, out)

    def test_corrupt_config_exit_1(self):
        """A corrupt config is a one-line error, exit 1, and stays as it was."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, "config.json")
        with open(path, "w") as f:
            f.write("{broken")
        code, out, err = self.run_main(["whoami"])
        self.assertEqual(code, 1)
        self.assertIn("not valid JSON", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(open(path).read(), "{broken")

    def test_unknown_mesh_exit_1(self):
        """--mesh naming a mesh not joined fails with exit 1."""
        code, _, err = self.run_main(["whoami", "--mesh", "nope"])
        self.assertEqual(code, 1)
        self.assertIn('"nope"', err)
