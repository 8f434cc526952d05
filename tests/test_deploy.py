# -*- test-case-name: tests.test_deploy -*-
"""
Tests for the systemd unit in C{deploy/}.
"""

import os
import shutil
import subprocess
import sys

from twisted.trial import unittest

UNIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy",
                    "claudemesh-broker.service")
INSTALLED_TWISTD = "/opt/claudemesh/venv/bin/twistd"


class SystemdUnitTests(unittest.TestCase):
    def setUp(self):
        with open(UNIT, encoding="utf-8") as f:
            self.text = f.read()

    def directives(self):
        found = {}
        for line in self.text.splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                key, _, value = line.partition("=")
                found.setdefault(key, []).append(value)
        return found

    def test_hardening(self):
        """The unit runs unprivileged, read-only, restarts on failure and reads its secrets
        from an EnvironmentFile."""
        d = self.directives()
        self.assertEqual(d["User"], ["claudemesh"])
        self.assertEqual(d["NoNewPrivileges"], ["yes"])
        self.assertEqual(d["ProtectSystem"], ["strict"])
        self.assertEqual(d["StateDirectory"], ["claudemesh"])
        self.assertEqual(d["Restart"], ["on-failure"])
        self.assertIn("/etc/claudemesh/broker.env", d["EnvironmentFile"])
        [start] = d["ExecStart"]
        self.assertIn("--nodaemon", start)
        self.assertIn("--pidfile=", start)
        self.assertTrue(start.endswith("claudemesh-broker"))

    def test_systemd_analyze_verify(self):
        """systemd-analyze verify accepts the unit (with ExecStart pointing at this
        environment's twistd, since /opt/claudemesh is not installed here)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.path.exists(twistd):
            raise unittest.SkipTest("no twistd script next to %s" % (sys.executable,))
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "claudemesh-broker.service")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.text.replace(INSTALLED_TWISTD, twistd))
        result = subprocess.run([analyze, "verify", path], capture_output=True, text=True,
                                timeout=60)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))
