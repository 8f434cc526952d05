# -*- test-case-name: tests.test_slow_consumer -*-
"""
Slow consumers (issue 8): a connection whose peer stops reading is closed
with 4003 C{slow_consumer} once more than C{max_outbound_buffer_bytes} queue
past its full transport buffer; its session goes into grace and its
deliveries stay queued. A peer that reads, however large its backlog, is
never closed.

The memory-wire tests use a transport that, like a real one, pauses its
producer when its buffer fills and resumes it when the buffer drains (and
whose peer can stop reading). The last test does it over real sockets.
"""

import os

import txaio
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.test import iosim
from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.broker import ws
from claudemesh.broker.ws import BrokerServerFactory
from soak.harness import Peer, bootstrap_mesh
from soak.scenarios import wait_until
from tests.clientfixture import InProcessBroker
from tests.meshfixture import BrokerFixture, client_factory, result_of

CAP = 4096
BUFFER = 8192


class ThrottledTransport(iosim.FakeTransport):
    """
    A memory transport with a bounded buffer: it pauses its streaming
    producer past C{BUFFER} bytes and resumes it once the peer took the
    bytes. With C{blocked} set, the peer takes nothing (it stopped reading).
    """

    blocked = False
    paused = False

    def write(self, data):
        iosim.FakeTransport.write(self, data)
        if (self.producer is not None and self.streamingProducer and not self.paused
                and sum(len(chunk) for chunk in self.stream) > BUFFER):
            self.paused = True
            self.producer.pauseProducing()

    def getOutBuffer(self):
        if self.blocked:
            return b""
        data = iosim.FakeTransport.getOutBuffer(self)
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        return data


class Wire:
    def __init__(self, case, number):
        fx = case.fx
        server_address = IPv4Address("TCP", "127.0.0.1", 7777)
        client_address = IPv4Address("TCP", "127.0.0.1", 41000 + number)
        self.server = case.factory.buildProtocol(client_address)
        self.client = client_factory("ws://127.0.0.1:7777/ws", fx.clock).buildProtocol(
            server_address)
        self.server_transport = ThrottledTransport(self.server, True, server_address,
                                                   client_address)
        self.pump_ = iosim.connect(
            self.server, self.server_transport,
            self.client, iosim.FakeTransport(self.client, False, client_address,
                                             server_address),
            clock=fx.clock)
        case.wires.append(self)
        case.pump()

    def send(self, frame, case):
        self.client.send_frame(frame)
        case.pump()

    def pushes(self):
        return [f for f in self.client.frames if f["type"] == "push" and "subtype" not in f]


class SlowConsumerTests(unittest.TestCase):
    def setUp(self):
        self.fx = BrokerFixture(max_outbound_buffer_bytes=CAP, send_rate_limit_per_min=0,
                                send_rate_limit_burst=0)
        self.patch(txaio.tx.config, "loop", self.fx.clock)
        self.factory = BrokerServerFactory(self.fx.broker, self.fx.clock, self.fx.settings)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")
        self.wires = []

    def pump(self):
        for _ in range(200):
            moved = [w.pump_.pump() for w in self.wires]
            self.fx.flush()
            if not any(moved):
                break

    def hello(self, peer, session_id="s1"):
        wire = Wire(self, len(self.wires))
        wire.send(peer.hello_dict(session_id=session_id), self)
        self.assertEqual(wire.client.frames[0]["type"], "hello_ack")
        return wire

    def send_dms(self, wire, count, size=1024, start=0):
        for n in range(start, start + count):
            nonce, ciphertext = crypto.encrypt_direct(
                self.alice.identity, self.bob.pubkey, b"%d:" % (n,) + b"x" * size)
            wire.client.send_frame({"type": "send", "id": "m%d" % (n,),
                                    "targetSpec": self.bob.pubkey, "priority": "now",
                                    "nonce": nonce, "ciphertext": ciphertext})
        self.pump()

    def bob_session(self):
        [session] = [s for s in self.fx.broker.meshes.cached(self.owner.mesh.id).sessions.values()
                     if s.member.id == self.bob.member.id]
        return session

    def test_backpressure_producer_registered(self):
        """After the upgrade the transport's producer is the protocol's _Backpressure."""
        bob = self.hello(self.bob)
        self.assertIsInstance(bob.server_transport.producer, ws._Backpressure)
        self.assertTrue(bob.server_transport.streamingProducer)

    def test_stopped_reader_closed_4003(self):
        """A peer that stops reading is closed 4003 slow_consumer once past the cap."""
        alice = self.hello(self.alice)
        bob = self.hello(self.bob)
        bob.server_transport.blocked = True
        self.send_dms(alice, 30)
        self.assertEqual(len([f for f in alice.client.frames if f["type"] == "ack"
                              and f["queued"]]), 30)
        self.assertTrue(bob.server.paused)
        # The close frame sits behind the unread bytes: the close handshake
        # times out and the connection is dropped.
        self.assertEqual(bob.server.state, bob.server.STATE_CLOSING)
        self.fx.advance(5)
        self.pump()
        self.assertIsNotNone(bob.client.close_info)
        session = self.bob_session()
        self.assertIsNone(session.connection)
        self.assertIsNotNone(session.grace_call)
        self.assertEqual(result_of(self.fx.store.count_queued()), 30)
        self.assertEqual(self.fx.broker.metrics.connections_active._value.get(), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_close_frame_4003_when_it_reads_again(self):
        """A peer that reads again sees the close frame 4003 'slow_consumer'."""
        alice = self.hello(self.alice)
        bob = self.hello(self.bob)
        bob.server_transport.blocked = True
        self.send_dms(alice, 30)
        bob.server_transport.blocked = False
        self.pump()
        self.assertEqual(bob.client.close_info[1:], (4003, "slow_consumer"))

    def test_deliveries_come_back(self):
        """After a 4003 close, a new connection gets every acknowledged DM."""
        alice = self.hello(self.alice)
        bob = self.hello(self.bob)
        bob.server_transport.blocked = True
        self.send_dms(alice, 30)
        self.fx.advance(5)
        self.pump()
        again = self.hello(self.bob)
        self.assertEqual(self.fx.broker.meshes.cached(self.owner.mesh.id)
                         .sessions[self.bob_session().presence_id].connection, again.server)
        got = {push["messageId"] for push in again.pushes()}
        acked = {f["messageId"] for f in alice.client.frames if f["type"] == "ack"}
        self.assertEqual(got, acked)
        self.assertEqual(len(got), 30)

    def test_paused_below_cap_stays(self):
        """A pause with fewer bytes than the cap behind it closes nothing, and resume resets."""
        alice = self.hello(self.alice)
        bob = self.hello(self.bob)
        producer = bob.server_transport.producer
        for _ in range(3):
            producer.pauseProducing()
            self.send_dms(alice, 2, size=CAP // 4)
            self.assertIsNone(bob.client.close_info)
            producer.resumeProducing()
            self.assertEqual(bob.server._paused_bytes, 0)
        self.assertIsNone(bob.client.close_info)

    def test_reading_peer_not_closed(self):
        """A peer that keeps reading keeps its connection however much flows through it."""
        alice = self.hello(self.alice)
        bob = self.hello(self.bob)
        for start in range(60):
            self.send_dms(alice, 1, start=start)
        self.assertIsNone(bob.client.close_info)
        self.assertEqual(len(bob.pushes()), 60)

    def test_large_backlog_drains_without_close(self):
        """A reading peer that reconnects to a backlog far over the cap gets it all, open."""
        alice = self.hello(self.alice)
        self.send_dms(alice, 40, size=2048)
        self.assertEqual(result_of(self.fx.store.count_queued()), 40)
        bob = self.hello(self.bob)
        self.assertIsNone(bob.client.close_info)
        self.assertEqual(len(bob.pushes()), 40)
        self.assertEqual([int(crypto.decrypt_direct(
            self.bob.identity, p["senderPubkey"], p["nonce"], p["ciphertext"]).split(b":")[0])
            for p in bob.pushes()], list(range(40)))

    def test_stopped_reader_with_backlog(self):
        """A peer that never reads its backlog holds at most one claim batch and keeps it queued."""
        alice = self.hello(self.alice)
        self.send_dms(alice, 40, size=2048)
        bob = Wire(self, len(self.wires))
        bob.server_transport.blocked = True
        bob.send(self.bob.hello_dict(), self)
        session = self.bob_session()
        outbox = session.outbox
        self.assertEqual(outbox.state(), "paused")
        self.assertLess(len(session.inflight), 40)
        self.assertEqual(result_of(self.fx.store.count_queued()), 40)
        # The auto-ping timeout drops it; everything is still queued.
        self.fx.advance(200)
        self.pump()
        self.assertIsNone(session.connection)
        self.assertEqual(outbox.state(), "closed")
        again = self.hello(self.bob)
        self.assertEqual(len(again.pushes()), 40)


class RealSocketSlowConsumerTests(unittest.TestCase):
    """
    An in-process broker on 127.0.0.1 with a 64 KiB outbound cap; the
    recipient's client stops reading its socket.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_paused_client_closed_and_queue_intact(self):
        """A client that stops reading is closed (4003, or dropped after); its DMs stay queued."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        broker = InProcessBroker(reactor, directory, max_outbound_buffer_bytes=64 * 1024,
                                 send_rate_limit_per_min=0, send_rate_limit_burst=0,
                                 hello_rate_per_ip=0)
        yield broker.start()
        self.addCleanup(broker.stop)
        http_base = "http://127.0.0.1:%d" % (broker.port.getHost().port,)
        members = yield bootstrap_mesh(reactor, http_base, broker.url, ["bob"])
        bob = Peer(reactor, members["bob"], broker.url)
        sender = Peer(reactor, members["owner"], broker.url)
        self.addCleanup(sender.close)
        self.addCleanup(bob.close)
        yield bob.connect(session_id="bob")
        yield sender.connect(session_id="sender")
        mesh = broker.broker.meshes.cached(members["bob"].mesh_id)
        [session] = [s for s in mesh.sessions.values() if s.session_id == "bob"]

        bob.auto_ack = False
        bob.client.transport.pauseProducing()
        sent = 0
        while session.connection is not None and sent < 4000:
            ids = []
            for _ in range(8):
                sender.send_dm(members["bob"], "slow-%d" % (sent,), "s%d" % (sent,),
                               padding=32 * 1024)
                ids.append("s%d" % (sent,))
                sent += 1
            yield wait_until(reactor, lambda: all(i in sender.acks for i in ids), 10, 0.005)
        self.assertIsNone(session.connection, "not closed after %d DMs" % (sent,))
        self.assertIsNotNone(session.grace_call)
        acked = {k[1:] for k, a in sender.acks.items() if a["queued"]}
        self.assertEqual(len(acked), sent)

        bob.client.transport.resumeProducing()
        close_info = yield bob.client.closed
        self.assertIn(close_info[1], (4003, 1006))
        yield broker.broker.writes.flushed()
        queued = yield broker.store.count_queued()
        self.assertEqual(queued, sent)

        again = Peer(reactor, members["bob"], broker.url)
        self.addCleanup(again.close)
        yield again.connect(session_id="bob")
        yield wait_until(reactor, lambda: len(set(bob.received) | set(again.received)) >= sent,
                         30)
        got = {t.split("-")[1] for t in set(bob.received) | set(again.received)}
        self.assertEqual(got, acked)
