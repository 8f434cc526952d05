"""
The client library (L{claudemesh.client.connection.MeshClient}) against a
real broker listening on 127.0.0.1 (SQLite store), with members made through
the broker's own routes (C{POST /meshes}, C{create_invite}, C{POST /join}).
Every client is stopped and the broker closed before a test ends.
"""

import os
import uuid

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from claudemesh.client import connection
from claudemesh.client.connection import MeshClient
from claudemesh.store.postgres import PostgresStore
from tests import pg
from tests.clientfixture import InProcessBroker, free_port


def wait_until(predicate, timeout=10.0, step=0.02):
    """
    Poll C{predicate} on the real reactor until it is true.
    """
    deadline = reactor.seconds() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("condition not met within %s s" % (timeout,))
            yield task.deferLater(reactor, step, lambda: None)

    return poll()


class FrozenClock:
    """
    The real reactor, but with its clock stopped: every hello signed through
    it carries the same millisecond.
    """

    def __init__(self, real):
        self._real = real
        self._now = real.seconds()

    def seconds(self):
        return self._now

    def __getattr__(self, name):
        return getattr(self._real, name)


class Inbox:
    """
    What one client's application received.
    """

    def __init__(self):
        self.messages = []
        self.queue = defer.DeferredQueue()
        self.hold = None

    def __call__(self, inbound):
        self.messages.append(inbound)
        self.queue.put(inbound)
        return self.hold

    def next(self, timeout=10.0):
        d = self.queue.get()
        d.addTimeout(timeout, reactor)
        return d


class ClientAgainstBrokerTests(unittest.TestCase):
    """
    DMs, broadcasts, groups, offline delivery, redelivery, idempotent sends,
    and the close-code actions, end to end.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.clients = []
        self.broker = InProcessBroker(reactor, self.mktemp_dir(), self.make_store(),
                                      grace_seconds=1)
        yield self.broker.start()
        self.addCleanup(self.broker.stop)
        self.addCleanup(self.stop_clients)
        self.owner_entry = yield self.broker.new_mesh("team", "owner")
        self.owner, self.owner_inbox = self.client(self.owner_entry)
        yield self.start(self.owner)
        self.alice_entry = yield self.broker.join((yield self.broker.invite(self.owner)),
                                                  "alice")
        self.bob_entry = yield self.broker.join((yield self.broker.invite(self.owner)), "bob")

    def make_store(self):
        """
        The store the broker runs on: C{None} for the embedded SQLite default.
        """
        return None

    def mktemp_dir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    def client(self, entry, session_id=None, reactor=reactor, **kwargs):
        inbox = Inbox()
        kwargs.setdefault("on_message", inbox)
        c = MeshClient(reactor, entry, session_id or "test-" + uuid.uuid4().hex[:8],
                       display_name=entry.displayName, **kwargs)
        self.clients.append(c)
        return c, inbox

    @defer.inlineCallbacks
    def start(self, *clients):
        """
        Connect C{clients}. (No waiting for their initial claims: a message
        sent while a recipient claims is claimed again once committed.)
        """
        for c in clients:
            yield c.start()

    @defer.inlineCallbacks
    def stop_clients(self):
        for c in self.clients:
            try:
                yield c.stop()
            except connection.ClientError:
                pass

    @defer.inlineCallbacks
    def test_direct_messages_both_ways(self):
        """Alice DMs Bob's member key; Bob replies to the sender key; both read plaintext."""
        alice, alice_inbox = self.client(self.alice_entry)
        bob, bob_inbox = self.client(self.bob_entry)
        yield self.start(alice, bob)
        ack = yield alice.send_text(self.bob_entry.pubkey, "hi bob")
        self.assertTrue(ack["queued"])
        got = yield bob_inbox.next()
        self.assertEqual((got.text, got.error, got.kind), ("hi bob", None, "direct"))
        self.assertEqual(got.senderMemberPubkey, self.alice_entry.pubkey)
        yield bob.send_text(got.senderPubkey, "hi alice")
        back = yield alice_inbox.next()
        self.assertEqual(back.text, "hi alice")

    @defer.inlineCallbacks
    def test_session_key_direct_message(self):
        """A DM to a session key is opened with that session's key."""
        from claudemesh import crypto

        session = crypto.Identity.generate()
        alice, _ = self.client(self.alice_entry)
        bob, bob_inbox = self.client(self.bob_entry, session_identity=session)
        yield self.start(alice, bob)
        yield alice.send_text(session.pubkey, "to your session")
        got = yield bob_inbox.next()
        self.assertEqual((got.text, got.targetSpec), ("to your session", session.pubkey))

    @defer.inlineCallbacks
    def test_broadcast(self):
        """A '*' message is opened with the mesh key by every other member."""
        alice, _ = self.client(self.alice_entry)
        bob, bob_inbox = self.client(self.bob_entry)
        yield self.start(alice, bob)
        yield alice.send_text("*", "hello all")
        got_bob = yield bob_inbox.next()
        got_owner = yield self.owner_inbox.next()
        self.assertEqual((got_bob.text, got_bob.kind), ("hello all", "broadcast"))
        self.assertEqual(got_owner.text, "hello all")

    @defer.inlineCallbacks
    def test_group_message(self):
        """An '@dev' message reaches a member whose session joined 'dev'."""
        alice, _ = self.client(self.alice_entry)
        bob, bob_inbox = self.client(self.bob_entry, hello_extra={"groups": [{"name": "dev"}]})
        yield self.start(alice, bob)
        ack = yield alice.send_text("@dev", "dev news")
        self.assertTrue(ack["queued"])
        got = yield bob_inbox.next()
        self.assertEqual((got.text, got.targetSpec), ("dev news", "@dev"))

    @defer.inlineCallbacks
    def test_offline_direct_message_after_connect(self):
        """A DM to a member with no session is delivered when it connects."""
        alice, _ = self.client(self.alice_entry)
        yield alice.start()
        ack = yield alice.send_text(self.bob_entry.pubkey, "while you were away")
        self.assertTrue(ack["queued"])
        bob, bob_inbox = self.client(self.bob_entry)
        yield bob.start()
        got = yield bob_inbox.next()
        self.assertEqual(got.text, "while you were away")

    @defer.inlineCallbacks
    def test_unacked_push_redelivered_and_deduplicated(self):
        """A push whose ack was lost comes again after a reconnect; the app sees it once."""
        alice, _ = self.client(self.alice_entry)
        bob, bob_inbox = self.client(self.bob_entry, random=lambda: 0.0)
        bob_inbox.hold = defer.Deferred()  # the app has not finished: no ack yet
        connects = []
        bob.on_connect = connects.append
        yield self.start(alice, bob)
        ack = yield alice.send_text(self.bob_entry.pubkey, "once")
        yield bob_inbox.next()
        sent = []
        real_ack = bob._ack
        bob._ack = lambda message_id: (sent.append(message_id), real_ack(message_id))
        bob._proto.dropConnection(abort=True)
        yield wait_until(lambda: len(connects) == 2)
        # The broker pushed it again on reconnect; the client acked the
        # duplicate without handing it over a second time.
        yield wait_until(lambda: ack["messageId"] in sent)
        bob_inbox.hold.callback(None)
        self.assertEqual([m.text for m in bob_inbox.messages], ["once"])
        # The broker stores the client_ack with its next group commit: ask
        # until it has (asking once raced that commit).
        statuses = []

        @defer.inlineCallbacks
        def delivered():
            deadline = reactor.seconds() + 10
            while True:
                reply = yield alice.request({"type": "message_status",
                                             "messageId": ack["messageId"]})
                statuses.append([r["status"] for r in reply["recipients"]])
                if statuses[-1] != ["queued"] or reactor.seconds() > deadline:
                    return statuses[-1]
                yield task.deferLater(reactor, 0.05, lambda: None)

        self.assertEqual((yield delivered()), ["delivered"])

    @defer.inlineCallbacks
    def test_retried_send_stored_once(self):
        """Sending again with the same id gets the same messageId and one delivery."""
        alice, _ = self.client(self.alice_entry)
        bob, bob_inbox = self.client(self.bob_entry)
        yield self.start(alice, bob)
        first = yield alice.send_text(self.bob_entry.pubkey, "one", send_id="fixed-id")
        again = yield alice.send_text(self.bob_entry.pubkey, "one", send_id="fixed-id")
        self.assertEqual(first["messageId"], again["messageId"])
        self.assertEqual(again["id"], "fixed-id")
        yield bob_inbox.next()
        yield alice.send_text(self.bob_entry.pubkey, "marker")
        marker = yield bob_inbox.next()
        self.assertEqual(marker.text, "marker")
        self.assertEqual([m.text for m in bob_inbox.messages], ["one", "marker"])

    @defer.inlineCallbacks
    def test_send_queued_while_disconnected(self):
        """A send made before the connection is up is written once it is."""
        alice, _ = self.client(self.alice_entry)
        bob, bob_inbox = self.client(self.bob_entry)
        yield self.start(bob)
        pending = alice.send_text(self.bob_entry.pubkey, "early")
        yield alice.start()
        ack = yield pending
        self.assertTrue(ack["queued"])
        self.assertEqual((yield bob_inbox.next()).text, "early")

    @defer.inlineCallbacks
    def test_session_replaced_stops(self):
        """A second hello for the same session stops the first client for good."""
        first, _ = self.client(self.alice_entry, session_id="same")
        yield first.start()
        second, _ = self.client(self.alice_entry, session_id="same")
        yield second.start()
        yield self.assertFailure(first.when_done(), connection.SessionReplaced)
        self.assertFalse(first.connected)
        self.assertTrue(second.connected)

    @defer.inlineCallbacks
    def test_kick_is_terminal(self):
        """A kicked client reports 4001 with the exact message and does not reconnect."""
        bob, _ = self.client(self.bob_entry)
        seen = []
        bob.on_terminal_close = lambda *args: seen.append(args)
        yield bob.start()
        reply = yield self.owner.request({"type": "kick", "target": "bob"})
        self.assertEqual(reply["kicked"], ["bob"])
        failure = yield self.assertFailure(bob.when_done(), connection.TerminalClose)
        self.assertEqual((failure.code, failure.message),
                         (4001, "Kicked from this mesh. Run claudemesh to rejoin."))
        self.assertEqual(seen, [(4001, "kicked", failure.message)])
        self.assertIsNone(bob._connect_call)

    @defer.inlineCallbacks
    def test_ban_reports_revoked_message(self):
        """A banned client reports the broker's revoked message, not the close reason."""
        bob, _ = self.client(self.bob_entry)
        yield bob.start()
        yield self.owner.request({"type": "ban", "target": "bob"})
        failure = yield self.assertFailure(bob.when_done(), connection.TerminalClose)
        self.assertEqual(failure.code, 4002)
        self.assertEqual(failure.message,
                         'You\'ve been removed from "team". Contact the mesh owner to rejoin.')

    @defer.inlineCallbacks
    def test_banned_hello_is_terminal(self):
        """A banned key's next hello ends with the revoked message too."""
        yield self.owner.request({"type": "ban", "target": "bob"})
        bob, _ = self.client(self.bob_entry)
        failure = yield self.assertFailure(bob.start(), connection.TerminalClose)
        self.assertEqual(failure.code, 4002)
        self.assertIn("Contact the mesh owner to rejoin.", failure.message)

    @defer.inlineCallbacks
    def test_two_sessions_hello_in_the_same_millisecond(self):
        """Two sessions of one member saying hello in the same ms both connect (no replayed)."""
        frozen = FrozenClock(reactor)
        first, _ = self.client(self.alice_entry, reactor=frozen)
        second, _ = self.client(self.alice_entry, reactor=frozen)
        yield self.start(first, second)
        peers = yield self.owner.request({"type": "list_peers"})
        sessions = [p["sessionId"] for p in peers["peers"] if p["displayName"] == "alice"]
        self.assertEqual(sorted(sessions), sorted([first.session_id, second.session_id]))

    @defer.inlineCallbacks
    def test_disconnect_reconnects(self):
        """A disconnected client is back within the first backoff step."""
        connects = []
        bob, _ = self.client(self.bob_entry, on_connect=connects.append)
        yield bob.start()
        started = reactor.seconds()
        reply = yield self.owner.request({"type": "disconnect", "target": "bob"})
        self.assertEqual(reply["affected"], ["bob"])
        yield wait_until(lambda: len(connects) == 2, timeout=5)
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertTrue(connects[1].get("restored"))

    @defer.inlineCallbacks
    def test_refused_request_fails_with_code(self):
        """A refusal is a RequestError carrying the broker's code."""
        alice, _ = self.client(self.alice_entry)
        yield alice.start()
        failure = yield self.assertFailure(
            alice.request({"type": "kick", "target": "bob"}), connection.RequestError)
        self.assertEqual(failure.code, "forbidden")

    @defer.inlineCallbacks
    def test_unreachable_gives_up(self):
        """With max_attempts, a broker that refuses connections ends in Unreachable."""
        import attr

        entry = attr.evolve(self.alice_entry,
                            brokerUrl="ws://127.0.0.1:%d/ws" % (free_port(),))
        c, _ = self.client(entry, max_attempts=2, random=lambda: 0.0)
        failure = yield self.assertFailure(c.start(), connection.Unreachable)
        self.assertIn("Cannot reach the broker", failure.message)


PG_DSN, PG_SKIP = pg.postgres_dsn_or_skip_reason()


class ClientAgainstPostgresBrokerTests(ClientAgainstBrokerTests):
    """
    The same end-to-end client tests with the broker on Postgres.
    """

    skip = PG_SKIP

    def make_store(self):
        schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, schema)
        return lambda: PostgresStore(PG_DSN, schema, reactor)
