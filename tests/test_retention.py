# -*- test-case-name: tests.test_retention -*-
"""
Tests for L{claudemesh.broker.retention.RetentionSweep}.
"""

from twisted.trial import unittest

from claudemesh.broker.metrics import BrokerMetrics
from claudemesh.broker.retention import DAY_MS, RetentionSweep
from tests.meshfixture import BrokerFixture


class RetentionTests(unittest.TestCase):
    def setUp(self):
        self.fx = BrokerFixture(message_ttl_seconds=3600)
        self.owner = self.fx.create_mesh()
        self.bob = self.fx.add_member(self.owner, "bob")
        self.owner.connect()

    def run_sweep(self, days=1, metrics=None):
        results = []
        RetentionSweep(self.fx.store, self.fx.clock, days, metrics).run().addBoth(
            results.append)
        self.fx.flush()
        return results[0]

    def status(self, message_id):
        return self.owner.request({"type": "message_status", "messageId": message_id})

    def test_expires_undelivered(self):
        """A delivery past its TTL becomes expired; message_status says so."""
        ack = self.owner.send(self.bob.pubkey)
        self.assertEqual(self.run_sweep(), (0, 0))
        self.fx.clock.advance(3601)
        expired, _ = self.run_sweep()
        self.assertEqual(expired, 1)
        self.assertEqual(self.status(ack["messageId"])["recipients"][0]["status"], "expired")

    def test_deletes_old_messages(self):
        """Messages older than the retention period with nothing pending are deleted."""
        ack = self.owner.send(self.bob.pubkey)
        self.fx.clock.advance(3601)
        self.run_sweep()
        self.fx.clock.advance(DAY_MS / 1000)
        _, deleted = self.run_sweep(days=1)
        self.assertEqual(deleted, 1)
        self.assertEqual(self.status(ack["messageId"]).code, "not_found")

    def test_zero_keeps_forever(self):
        """Retention 0 deletes nothing."""
        self.owner.send(self.bob.pubkey)
        self.fx.clock.advance(30 * DAY_MS / 1000)
        self.assertEqual(self.run_sweep(days=0), (1, 0))

    def test_gauge(self):
        """The sweep sets the queued-deliveries gauge."""
        metrics = BrokerMetrics()
        self.owner.send(self.bob.pubkey)
        self.run_sweep(metrics=metrics)
        self.assertEqual(
            metrics.registry.get_sample_value("claudemesh_deliveries_queued"), 1.0)

    def test_sweeps_in_batches(self):
        """
        A sweep works in transactions of at most its batch size and gives the
        reactor a turn between two: a send made while it runs is stored before
        the sweep's last batch, not after the whole sweep.
        """
        for _ in range(5):
            self.owner.send(self.bob.pubkey)
        self.fx.clock.advance(3601 + DAY_MS / 1000)
        store = self.fx.store
        calls = []

        def recording(name):
            original = getattr(store, name)

            def call(*args):
                calls.append((name,) + args[1:])
                return original(*args)

            self.patch(store, name, call)

        for name in ("expire_deliveries", "delete_messages_before", "delete_send_keys_before",
                     "write_batch"):
            recording(name)
        results = []
        RetentionSweep(store, self.fx.clock, 1, batch=2).run().addBoth(results.append)
        # The first batch ran; the sweep now waits for the reactor's turn.
        self.assertEqual(results, [])
        ack = self.owner.send(self.bob.pubkey)
        self.assertTrue(ack["queued"])
        self.fx.flush()
        self.assertEqual(results, [(5, 5)])
        sweep = [i for i, call in enumerate(calls) if call[0] != "write_batch"]
        [written] = [i for i, call in enumerate(calls) if call[0] == "write_batch"]
        self.assertLess(sweep[0], written)
        self.assertLess(written, sweep[-1])
        self.assertEqual({call[-1] for call in calls if call[0] != "write_batch"}, {2})
        self.assertEqual([call[0] for call in calls if call[0] != "write_batch"],
                         ["expire_deliveries"] * 3 + ["delete_messages_before"] * 3
                         + ["delete_send_keys_before"])
