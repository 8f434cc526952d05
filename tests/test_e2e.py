# -*- test-case-name: tests.test_e2e -*-
"""
End-to-end tests over real sockets: the broker's Site (L{make_site}) with the
real L{BrokerServerFactory} listening on 127.0.0.1, a real store (SQLite
file, and Postgres when reachable), and small Autobahn clients. These are
the only tests that use the global reactor; every client connection, server
connection and listening port is closed, and every store closed, before a
test ends.
"""

import itertools
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.broker.settings import BrokerSettings
from claudemesh.store.postgres import PostgresStore
from claudemesh.store.records import (
    ClaimRequest,
    MemberRecord,
    MeshRecord,
    NewDelivery,
    NewMessage,
)
from claudemesh.store.sqlite import SQLiteStore
from tests import pg
from tests.clientfixture import InProcessBroker
from tests.meshfixture import Peer, client_factory

PG_DSN, PG_SKIP = pg.postgres_dsn_or_skip_reason()
MAX_BYTES = 4096
_ids = itertools.count(1)


class _RealClock:
    """
    What L{Peer.hello_dict} needs of a fixture, on the real clock.
    """

    @staticmethod
    def now_ms():
        return int(reactor.seconds() * 1000)


class EndToEndMixin:
    """
    A broker on a real store behind a real listening port; C{make_store}
    returns a new (unopened) store on the same database each time it is
    called.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.settings = BrokerSettings(max_message_bytes=MAX_BYTES)
        self.clients = []
        self.server = self.port = self.broker = self.store = None
        self.addCleanup(self.shut_everything)
        yield self.start_broker()
        yield self.make_mesh()

    @defer.inlineCallbacks
    def start_broker(self):
        # The one in-process server of the test suite (tests/clientfixture.py).
        self.server = InProcessBroker(reactor, self.mktemp(), make_store=self.make_store,
                                      max_message_bytes=MAX_BYTES)
        yield self.server.start()
        self.store, self.broker = self.server.store, self.server.broker
        self.factory, self.port, self.url = self.server.factory, self.server.port, self.server.url

    def server_gone(self):
        return self.server.server_gone()

    @defer.inlineCallbacks
    def close_clients(self):
        for client in self.clients:
            if client.close_info is None:
                if client.state == client.STATE_OPEN:
                    client.sendClose(1000)
                else:
                    client.transport.loseConnection()
            yield client.closed
        self.clients = []
        yield self.server_gone()

    @defer.inlineCallbacks
    def stop_broker(self):
        """
        Everything a broker process shutdown does: clients gone, port
        closed, pending writes flushed, store closed.
        """
        yield self.close_clients()
        if self.server is not None:
            server, self.server = self.server, None
            yield server.stop()
        self.broker = self.store = self.port = None

    def shut_everything(self):
        return self.stop_broker()

    @defer.inlineCallbacks
    def make_mesh(self):
        now = _RealClock.now_ms()
        n = next(_ids)
        owner_identity = crypto.Identity.generate()
        mesh = MeshRecord("mesh-e2e-%d" % n, "team", "team-%d" % n, owner_identity.pubkey, now)
        owner = MemberRecord("own-%d" % n, mesh.id, owner_identity.pubkey, "owner", "owner", now)
        yield self.store.create_mesh(mesh, owner)
        self.peers = {}
        for name in ("alice", "bob"):
            identity = crypto.Identity.generate()
            member = MemberRecord("%s-%d" % (name, n), mesh.id, identity.pubkey, name, "member",
                                  now)
            yield self.store.add_member(member)
            self.peers[name] = Peer(_RealClock(), mesh, member, identity)
        self.alice, self.bob = self.peers["alice"], self.peers["bob"]

    @defer.inlineCallbacks
    def connect(self, max_message_bytes=0):
        """
        A client connected and open (no hello yet).
        """
        factory = client_factory(self.url, reactor, max_message_bytes)
        built = defer.Deferred()
        build = factory.buildProtocol

        def buildProtocol(addr):
            client = build(addr)
            self.clients.append(client)
            built.callback(client)
            return client

        factory.buildProtocol = buildProtocol
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        client = yield built
        yield client.opened
        return client

    @defer.inlineCallbacks
    def hello(self, peer, **kwargs):
        client = yield self.connect()
        client.send_frame(peer.hello_dict(**kwargs))
        ack = yield self.next_frame(client)
        self.assertEqual(ack["type"], "hello_ack", ack)
        return client

    @defer.inlineCallbacks
    def next_frame(self, client, type_name=None):
        """
        The next frame the client receives (of C{type_name}, skipping
        system pushes and other frames).
        """
        while True:
            frame = yield client.queue.get()
            if type_name is None or (frame["type"] == type_name and "subtype" not in frame):
                return frame

    @defer.inlineCallbacks
    def send_dm(self, client, sender, recipient, plaintext, client_id):
        nonce, ciphertext = crypto.encrypt_direct(sender.identity, recipient.pubkey, plaintext)
        client.send_frame({"type": "send", "id": client_id, "targetSpec": recipient.pubkey,
                           "priority": "next", "nonce": nonce, "ciphertext": ciphertext})
        ack = yield self.next_frame(client, "ack")
        self.assertEqual((ack["id"], ack["queued"]), (client_id, True), ack)
        return ack, nonce, ciphertext


class SQLiteEndToEndTests(EndToEndMixin, unittest.TestCase):
    def make_store(self):
        if not hasattr(self, "db_path"):
            directory = self.mktemp()
            os.makedirs(directory)
            self.db_path = os.path.join(directory, "broker.db")
        return SQLiteStore(self.db_path, reactor)

    @defer.inlineCallbacks
    def test_two_peers_dm_both_ways(self):
        """Two peers say hello, list each other, and DM both ways with byte-identical ciphertext."""
        alice = yield self.hello(self.alice)
        bob = yield self.hello(self.bob)
        alice.send_frame({"type": "list_peers", "_reqId": "p"})
        peers = yield self.next_frame(alice, "peers_list")
        self.assertEqual(peers["_reqId"], "p")
        self.assertEqual(sorted(p["displayName"] for p in peers["peers"]), ["alice", "bob"])

        ack, nonce, ciphertext = yield self.send_dm(alice, self.alice, self.bob, b"hi bob", "a1")
        push = yield self.next_frame(bob, "push")
        self.assertEqual((push["messageId"], push["nonce"], push["ciphertext"]),
                         (ack["messageId"], nonce, ciphertext))
        self.assertEqual(crypto.decrypt_direct(
            self.bob.identity, push["senderPubkey"], push["nonce"], push["ciphertext"]), b"hi bob")
        bob.send_frame({"type": "client_ack", "messageId": push["messageId"]})

        ack, nonce, ciphertext = yield self.send_dm(bob, self.bob, self.alice, b"hi alice", "b1")
        push = yield self.next_frame(alice, "push")
        self.assertEqual((push["messageId"], push["nonce"], push["ciphertext"]),
                         (ack["messageId"], nonce, ciphertext))
        self.assertEqual(crypto.decrypt_direct(
            self.alice.identity, push["senderPubkey"], push["nonce"], push["ciphertext"]),
            b"hi alice")

    @defer.inlineCallbacks
    def test_oversized_frame_closes_1009(self):
        """A frame over max_message_bytes makes the client see close 1009, not 1006."""
        client = yield self.hello(self.alice)
        client.sendMessage(b'{"type":"list_peers","pad":"' + b"x" * (MAX_BYTES * 2) + b'"}')
        was_clean, code, reason = yield client.closed
        self.assertEqual(code, 1009, reason)

    @defer.inlineCallbacks
    def test_refused_hello_closes_1008_with_reason(self):
        """A refused hello makes the client see the error frame, then 1008 with the reason."""
        client = yield self.connect()
        hello = self.alice.hello_dict(timestamp=_RealClock.now_ms() - 120_000)
        client.send_frame(hello)
        was_clean, code, reason = yield client.closed
        self.assertEqual(([f.get("code") for f in client.frames], code, reason),
                         (["timestamp_skew"], 1008, "timestamp_skew"))

    @defer.inlineCallbacks
    def test_revoked_hello_closes_4002(self):
        """A revoked member's client sees error revoked, then 4002 banned."""
        yield self.store.ban_member(self.alice.member.id, _RealClock.now_ms())
        client = yield self.connect()
        client.send_frame(self.alice.hello_dict())
        was_clean, code, reason = yield client.closed
        self.assertEqual(([f.get("code") for f in client.frames], code, reason),
                         (["revoked"], 4002, "banned"))

    @defer.inlineCallbacks
    def test_restart_keeps_queued_deliveries(self):
        """A DM queued for an offline peer survives a broker restart on the same database."""
        yield restart_scenario(self)

    def test_fresh_delivery_stored_leased(self):
        """A delivery enqueued with a lease is stored leased: another session cannot claim it."""
        return stored_lease_scenario(self)

    @defer.inlineCallbacks
    def test_redelivery_after_drop(self):
        """A push not acknowledged before the connection dropped comes again on reconnect."""
        alice = yield self.hello(self.alice)
        bob = yield self.hello(self.bob)
        ack, nonce, ciphertext = yield self.send_dm(alice, self.alice, self.bob, b"again", "d1")
        first = yield self.next_frame(bob, "push")
        bob.transport.abortConnection()
        yield bob.closed
        bob = yield self.hello(self.bob)
        second = yield self.next_frame(bob, "push")
        self.assertEqual((second["messageId"], second["ciphertext"]),
                         (first["messageId"], ciphertext))


@defer.inlineCallbacks
def stored_lease_scenario(case):
    """
    A delivery the broker pushes at once is stored leased to that session:
    no other session's claim takes it until the lease is released.
    """
    store, now = case.store, _RealClock.now_ms()
    alice, bob = case.alice, case.bob
    message = NewMessage(
        id="m-lease-%d" % (next(_ids),), mesh_id=alice.mesh.id,
        sender_member_id=alice.member.id, sender_pubkey=alice.pubkey,
        sender_member_pubkey=alice.pubkey, target_spec=bob.pubkey, priority="next",
        nonce="bm9uY2U=", ciphertext="eA==", created_at=now, expires_at=now + 60_000,
        deliveries=(NewDelivery(bob.member.id, lease_session="p1", lease_until=now + 30_000),))
    yield store.enqueue([message], [])
    [row] = yield store.message_deliveries(message.id)
    case.assertEqual((row.state, row.lease_session, row.lease_until, row.attempts),
                     ("leased", "p1", now + 30_000, 1))
    claimed = yield store.claim_deliveries(
        ClaimRequest(bob.member.id, None, "p2", (), ("next",), now, 30_000, 10))
    case.assertEqual(claimed, [])
    yield store.release_leases(["p1"])
    claimed = yield store.claim_deliveries(
        ClaimRequest(bob.member.id, None, "p2", (), ("next",), now, 30_000, 10))
    case.assertEqual([(c.message_id, c.attempts) for c in claimed], [(message.id, 2)])


@defer.inlineCallbacks
def restart_scenario(case):
    alice = yield case.hello(case.alice)
    sent = []
    for i in range(3):
        result = yield case.send_dm(alice, case.alice, case.bob, b"later %d" % i, "r%d" % i)
        sent.append(result)
    yield case.stop_broker()
    yield case.start_broker()
    bob = yield case.hello(case.bob)
    received = []
    for _ in sent:
        push = yield case.next_frame(bob, "push")
        received.append(push)
    case.assertEqual([(p["messageId"], p["nonce"], p["ciphertext"]) for p in received],
                     [(ack["messageId"], nonce, ciphertext) for ack, nonce, ciphertext in sent])
    case.assertEqual([crypto.decrypt_direct(case.bob.identity, p["senderPubkey"], p["nonce"],
                                            p["ciphertext"]) for p in received],
                     [b"later 0", b"later 1", b"later 2"])
    for push in received:
        bob.send_frame({"type": "client_ack", "messageId": push["messageId"]})
    # A retried send with an id used before the restart is still stored once.
    nonce, ciphertext = crypto.encrypt_direct(case.alice.identity, case.bob.pubkey, b"x")
    alice = yield case.hello(case.alice, session_id="s2")
    alice.send_frame({"type": "send", "id": "r0", "targetSpec": case.bob.pubkey,
                      "nonce": nonce, "ciphertext": ciphertext})
    ack = yield case.next_frame(alice, "ack")
    case.assertEqual((ack["messageId"], ack["queued"]), (sent[0][0]["messageId"], True))


class PostgresEndToEndTests(EndToEndMixin, unittest.TestCase):
    skip = PG_SKIP

    def setUp(self):
        # Registered first, so it runs last: after the store is closed.
        self.schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, self.schema)
        return EndToEndMixin.setUp(self)

    def make_store(self):
        return PostgresStore(PG_DSN, self.schema, reactor)

    @defer.inlineCallbacks
    def test_restart_keeps_queued_deliveries(self):
        """A DM queued for an offline peer survives a broker restart on the same Postgres schema."""
        yield restart_scenario(self)

    def test_fresh_delivery_stored_leased(self):
        """A delivery enqueued with a lease is stored leased: another session cannot claim it."""
        return stored_lease_scenario(self)
