# -*- test-case-name: tests.test_shutdown -*-
"""
Graceful shutdown (issue 8): L{Broker.stopService} on an inline SQLite store and a
fake clock, over memory wires, and a real C{twistd claudemesh-broker}
subprocess stopped with SIGTERM and started again on the same data
directory.
"""

import json
import os

import txaio
from twisted.internet import defer, reactor
from twisted.trial import unittest

from claudemesh import protocol
from claudemesh.broker.ws import BrokerServerFactory
from soak.harness import BrokerProcess, Peer, bootstrap_mesh
from soak.scenarios import NO_LIMITS, wait_until
from tests.meshfixture import BrokerFixture, WireConnection, audit_rows, result_of


class CoreShutdownTests(unittest.TestCase):
    """
    alice and bob live, carol in grace, then the broker stops.
    """

    def setUp(self):
        self.fx = BrokerFixture()
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")
        self.carol = self.fx.add_member(self.owner, "carol")
        self.bob.connect()
        self.alice.connect()
        self.carol.connect()
        self.carol.drop()
        self.bob.connection.clear()

    def stop(self):
        results = []
        self.fx.broker.stopService().addBoth(results.append)
        self.fx.flush()
        self.fx.advance(1)
        self.assertEqual(results, [None])

    def test_live_sessions_closed_1001(self):
        """Every live connection is closed with 1001 'shutting down'."""
        self.stop()
        self.assertEqual(self.alice.connection.closed, (1001, "shutting down"))
        self.assertEqual(self.bob.connection.closed, (1001, "shutting down"))

    def test_sessions_closed_in_store(self):
        """Live and in-grace sessions are all marked closed in the store."""
        mesh_id = self.owner.mesh.id
        self.assertEqual(len(result_of(self.fx.store.list_open_sessions(mesh_id))), 3)
        self.stop()
        self.assertEqual(result_of(self.fx.store.list_open_sessions(mesh_id)), [])
        self.assertEqual(self.fx.broker.meshes.cached(mesh_id).sessions, {})

    def test_pending_writes_flushed(self):
        """A send still in the group-commit queue is committed and acked queued:true."""
        frame = protocol.decode(json.dumps({
            "type": "send", "id": "last", "targetSpec": self.bob.pubkey,
            "nonce": "bm9uY2U=", "ciphertext": "eA=="}))
        acks = []
        self.fx.broker.delivery.send(self.alice.session, frame).addBoth(acks.append)
        self.assertEqual((acks, result_of(self.fx.store.count_queued())), ([], 0))
        self.stop()
        self.assertEqual(acks[0]["queued"], True)
        [row] = result_of(self.fx.store.message_deliveries(acks[0]["messageId"]))
        self.assertEqual(row.member_id, self.bob.member.id)

    def test_no_peer_left(self):
        """Nobody is told peer_left (everyone is leaving), in frames or in the audit log."""
        self.stop()
        self.assertEqual(self.bob.connection.events("peer_left"), [])
        self.assertEqual(self.alice.connection.events("peer_left"), [])
        self.assertNotIn("peer_left", [e.event_type for e in audit_rows(self.fx, self.owner.mesh.id)
                                       if e.created_at >= self.fx.now_ms() - 5000])

    def test_no_timer_left(self):
        """The sweep and the grace timers are cancelled: nothing is left on the clock."""
        self.stop()
        self.assertEqual(self.fx.clock.getDelayedCalls(), [])

    def test_queued_delivery_survives(self):
        """A delivery queued for a member in grace is still queued after the stop."""
        self.alice.send(self.carol.pubkey, b"for later")
        self.stop()
        self.assertEqual(result_of(self.fx.store.count_queued()), 1)


class WireShutdownTests(unittest.TestCase):
    def setUp(self):
        self.fx = BrokerFixture()
        self.patch(txaio.tx.config, "loop", self.fx.clock)
        self.factory = BrokerServerFactory(self.fx.broker, self.fx.clock, self.fx.settings)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")

    def test_client_sees_1001(self):
        """A real client over a memory wire sees a clean close 1001 'shutting down'."""
        wire = WireConnection(self.fx, self.factory)
        wire.send(self.alice.hello_dict())
        self.assertEqual(wire.last()["type"], "hello_ack")
        self.fx.broker.stopService()
        wire.pump()
        self.fx.advance(1)
        wire.pump()
        self.assertEqual(wire.client.close_info, (True, 1001, "shutting down"))
        self.assertEqual(self.flushLoggedErrors(), [])


class TwistdShutdownTests(unittest.TestCase):
    """
    A real C{twistd -n claudemesh-broker} on SQLite, stopped with SIGTERM.
    """

    timeout = 90

    @defer.inlineCallbacks
    def test_sigterm_then_restart(self):
        """SIGTERM: client sees 1001, twistd exits 0 within 10 s; a restart delivers the DM."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        broker = BrokerProcess(reactor, workdir, args=NO_LIMITS)
        self.addCleanup(broker.cleanup)
        yield broker.start()
        members = yield bootstrap_mesh(reactor, broker.http, broker.url, ["bob"])
        owner = Peer(reactor, members["owner"], broker.url)
        self.addCleanup(owner.close)
        yield owner.connect()
        owner.send_dm(members["bob"], "sent before the restart", "m1")
        ack = yield owner.wait_for(lambda f: f.get("type") == "ack")
        self.assertEqual((ack["id"], ack["queued"]), ("m1", True))

        exit_code, signal, seconds = yield broker.terminate(timeout=10)
        close_info = yield owner.client.closed
        self.assertEqual(close_info[1:], (1001, "shutting down"))
        self.assertEqual((exit_code, signal), (0, None), broker.log_text()[-3000:])
        self.assertLess(seconds, 10)
        self.assertNotIn("Traceback", broker.log_text())

        yield broker.start()
        bob = Peer(reactor, members["bob"], broker.url)
        self.addCleanup(bob.close)
        yield bob.connect()
        yield wait_until(reactor, lambda: bob.received, 10)
        self.assertEqual(list(bob.received), ["sent before the restart"])
