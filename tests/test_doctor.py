"""
C{claudemesh doctor} as a subprocess against a live broker (C{twistd} on a
free port) and against a dead one, with C{HOME} a temporary directory and a
fake C{claude} on C{PATH}.
"""

import json
import os
import stat
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.clientfixture import free_port
from tests.test_launch import FAKE_CLAUDE
from tests.test_mcp_server import BrokerProcessMixin


class DoctorTests(BrokerProcessMixin, SynchronousTestCase):
    """
    Every check passes on a good setup; each broken piece is a ✗ with a fix.
    """

    def setUp(self):
        self.start_broker()
        self.bin = os.path.join(self.tmp, "bin")
        os.makedirs(self.bin)
        claude = os.path.join(self.bin, "claude")
        with open(claude, "w") as f:
            f.write(FAKE_CLAUDE % (sys.executable,))
        os.chmod(claude, 0o755)
        self.mesh_with()

    def doctor_env(self, **extra):
        return self.env("owner", PATH=self.bin + os.pathsep + os.environ.get("PATH", ""),
                        **extra)

    def doctor(self, *args):
        return self.cm("owner", "doctor", *args, env=self.doctor_env())

    def test_live_broker_all_good(self):
        """After install, against the live broker: all ✓ (latency, membership, skew), exit 0."""
        self.assertEqual(self.cm("owner", "install", env=self.doctor_env())[0], 0)
        code, out, err = self.doctor()
        self.assertEqual(code, 0, out + err)
        self.assertTrue(out.startswith("claudemesh doctor  (v"), out)
        self.assertNotIn("✗", out)
        self.assertIn("✓ team: broker %s reachable (" % (self.url,), out)
        self.assertIn("member owner (owner)", out)
        self.assertIn("✓ team: clock skew against the broker ", out)
        self.assertIn("✓ MCP server registered", out)
        self.assertIn("✓ hooks registered", out)
        self.assertIn("✓ claude found at %s (Claude Code 2.1.332)"
                      % (os.path.join(self.bin, "claude"),), out)
        self.assertIn("✓ delivery: inbox socket", out)
        document = json.loads(self.doctor("--json")[1])
        self.assertTrue(document["ok"])
        self.assertTrue(all(c["ok"] for c in document["checks"]))

    def test_dead_broker_and_missing_setup(self):
        """A dead broker, no install, a loose config mode: ✗ lines with fixes, exit 1."""
        path = os.path.join(self.tmp, "owner", "config", "config.json")
        document = json.load(open(path))
        dead = "ws://127.0.0.1:%d/ws" % (free_port(),)
        document["meshes"][0]["brokerUrl"] = dead
        with open(path, "w") as f:
            json.dump(document, f)
        os.chmod(path, 0o644)
        code, out, err = self.doctor()
        self.assertEqual(code, 1, out + err)
        self.assertNotIn("Traceback", out + err)
        self.assertIn("✗ team: broker %s unreachable" % (dead,), out)
        self.assertIn("✗ %s (0644)" % (path,), out)
        self.assertIn("→ chmod 600 %s" % (path,), out)
        self.assertIn("✗ MCP server not registered", out)
        self.assertIn("✗ hooks missing (UserPromptSubmit, Stop, StopFailure, SessionStart)", out)
        self.assertEqual(out.count("→ claudemesh install"), 2)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)  # reports, never fixes

    def test_old_claude_code_without_hooks(self):
        """An old Claude Code and no hooks: no delivery path works, ✗ with the fix."""
        env = self.doctor_env(FAKE_CLAUDE_VERSION="2.0.5 (Claude Code)")
        code, out, _ = self.cm("owner", "doctor", env=env)
        self.assertEqual(code, 1, out)
        self.assertIn("✗ delivery: none works: Claude Code 2.0.5 has no inbox socket", out)
        self.assertIn("→ claudemesh install (hooks), or update Claude Code", out)
        self.cm("owner", "install", env=env)
        code, out, _ = self.cm("owner", "doctor", env=env)
        self.assertEqual(code, 0, out)
        self.assertIn("✓ delivery: hooks only, because Claude Code 2.0.5 has no inbox socket", out)

    def test_third_party_provider(self):
        """On Bedrock the inbox socket is not there: doctor says hooks only."""
        env = self.doctor_env(CLAUDE_CODE_USE_BEDROCK="1")
        self.cm("owner", "install", env=env)
        code, out, _ = self.cm("owner", "doctor", env=env)
        self.assertEqual(code, 0, out)
        self.assertIn("✓ delivery: hooks only, because the inbox socket is not on Bedrock", out)

    def test_cli_only_user(self):
        """Without Claude Code the Claude Code checks are optional (–): a CLI-only setup exits 0."""
        env = self.env("owner", PATH=os.path.dirname(sys.executable) + os.pathsep + os.defpath)
        code, out, err = self.cm("owner", "doctor", env=env)
        self.assertEqual(code, 0, out + err)
        self.assertNotIn("✗", out)
        self.assertIn("– claude not found on PATH (only needed", out)
        self.assertIn("– MCP server not registered", out)
        self.assertNotIn("delivery:", out)
        checks = json.loads(self.cm("owner", "doctor", "--json", env=env)[1])["checks"]
        self.assertTrue([c for c in checks if c.get("optional") and not c["ok"]])
