# -*- test-case-name: tests.test_faults -*-
"""
Short versions of the fault runs of issue 8 (the long ones are C{make soak},
L{soak.scenarios}): a real C{twistd claudemesh-broker} killed with
C{kill -9} in the middle of a send burst, and a throwaway Postgres cluster
stopped under a running broker. Every process and cluster is stopped and
every client closed before a test ends.
"""

import os

from twisted.internet import reactor
from twisted.trial import unittest

from soak import harness, scenarios


def _workdir(case):
    path = os.path.abspath(case.mktemp())
    os.makedirs(path)
    return path


class CrashTests(unittest.TestCase):
    timeout = 120

    def test_kill_9_mid_burst(self):
        """kill -9 mid-burst, restart: acked are delivered, delivered were acked or in flight."""
        d = scenarios.crash_run(reactor, _workdir(self), messages=5000, kill_after=100)

        def check(figures):
            self.assertEqual(figures["kill_status"], (None, 9))
            self.assertGreaterEqual(figures["acknowledged"], 100)
            # The kill came in the middle of the burst.
            self.assertLess(figures["sent"], 5000, figures)
            self.assertEqual(figures["lost"], [], figures)
            self.assertEqual(figures["phantom"], [], figures)
            self.assertEqual(figures["refused_delivered"], [], figures)

        return d.addCallback(check)


class StoreOutageTests(unittest.TestCase):
    timeout = 180
    if harness.find_initdb() is None:
        skip = "initdb not found: a throwaway PostgreSQL cluster cannot be made"
    elif os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            skip = "running as root without a 'postgres' user to run initdb as"

    def test_postgres_stopped_mid_traffic(self):
        """Postgres down: ready 503, sends refused store_unavailable; back up: recovers in place."""
        d = scenarios.outage_run(reactor, _workdir(self), outage=1.0, after=0.5)

        def check(figures):
            self.assertEqual(figures["ready_before"], 200)
            self.assertEqual(figures["health_during"], (200, "down"))
            self.assertGreater(figures["refused_store_unavailable"], 0, figures)
            self.assertEqual(figures["refused_other"], [], figures)
            self.assertEqual(figures["false_queued"], [], figures)
            self.assertEqual(figures["lost"], [], figures)
            self.assertEqual(figures["refused_delivered"], [], figures)
            self.assertTrue(figures["recovered_sends"], figures)
            self.assertTrue(figures["same_process"])

        return d.addCallback(check)
