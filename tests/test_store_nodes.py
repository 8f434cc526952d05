"""
Tests for L{claudemesh.store.sql.nodes} (issue 15): the nodes of a cluster,
their heartbeats, and closing what a dead node left, on every store (SQLite
in its thread, SQLite inline, Postgres); the notices' wire form; the
Postgres backplane (C{LISTEN}/C{NOTIFY}, a notice sent only by a committed
transaction, the listening connection dropped and back).
"""

import os

import psycopg2
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudemesh.store import PostgresStore, SQLiteStore
from claudemesh.store.interface import DatabaseInUse
from claudemesh.store.listener import PostgresBackplane
from claudemesh.store.records import (
    ClaimRequest,
    NewDelivery,
    NodeRecord,
    Notice,
    ReapedSession,
    WriteBatch,
)
from claudemesh.store.sql import notices
from tests import pg
from tests.test_store import ALL, LEASE, NOW, PG_DSN, PG_SKIP, StoreFixture

SECOND = 1000


class NodeStoreTestsMixin(StoreFixture):
    """
    The nodes half of every L{IStore}; a concrete class provides
    C{makeStore()}.
    """

    @defer.inlineCallbacks
    def setUp(self):
        yield StoreFixture.setUp(self)
        self.mesh, self.owner = yield self.makeMesh()
        self.alice = yield self.addMember(self.mesh, display_name="alice")

    def node(self, node_id, name=None, heartbeat_at=NOW):
        return NodeRecord(node_id, name or node_id, "host", 1, NOW, heartbeat_at)

    @defer.inlineCallbacks
    def openOn(self, node_id, member=None):
        session = self.makeSession(self.mesh, member or self.alice, node_id=node_id)
        yield self.store.open_sessions([session])
        return session

    @defer.inlineCallbacks
    def leaseTo(self, session):
        """
        Store a message to alice and lease it to C{session}.
        """
        message = self.makeMessage(self.mesh, self.owner, [NewDelivery(self.alice.id)])
        yield self.store.enqueue([message])
        rows = yield self.store.claim_deliveries(ClaimRequest(
            self.alice.id, None, session.presence_id, (), ALL, NOW, LEASE, 10))
        self.assertEqual(len(rows), 1)
        return message

    @defer.inlineCallbacks
    def queued(self):
        rows = yield self.store.claim_deliveries(ClaimRequest(
            self.alice.id, None, "someone-else", (), ALL, NOW + 1, LEASE, 10))
        return [row.message_id for row in rows]

    @defer.inlineCallbacks
    def test_session_keeps_its_node(self):
        """A session row says which node holds it, and whether it is watching or listed."""
        session = self.makeSession(self.mesh, self.alice, node_id="n1", watch=True,
                                   presence=False)
        yield self.store.open_sessions([session])
        self.assertEqual((yield self.store.get_session(session.presence_id)), session)
        self.assertIsNone((yield self.store.get_session("nobody")))
        found = yield self.store.find_open_sessions(self.mesh.id, self.alice.id,
                                                    session.session_id)
        self.assertEqual(found, [session])
        yield self.store.close_sessions([session.presence_id], NOW + 1)
        self.assertEqual((yield self.store.find_open_sessions(
            self.mesh.id, self.alice.id, session.session_id)), [])

    @defer.inlineCallbacks
    def test_heartbeat(self):
        """A running node's heartbeat moves; one found dead learns it, and runs again."""
        yield self.store.register_node(self.node("n1"))
        self.assertTrue((yield self.store.heartbeat_node("n1", NOW + 5 * SECOND)))
        running = yield self.store.running_nodes(NOW + 5 * SECOND)
        self.assertEqual([(n.id, n.heartbeat_at) for n in running], [("n1", NOW + 5 * SECOND)])
        yield self.store.stop_node("n1", NOW + 6 * SECOND)
        self.assertEqual((yield self.store.running_nodes(0)), [])
        self.assertFalse((yield self.store.heartbeat_node("n1", NOW + 7 * SECOND)))
        self.assertEqual([n.id for n in (yield self.store.running_nodes(0))], ["n1"])

    @defer.inlineCallbacks
    def test_reap_dead_node(self):
        """
        A node whose heartbeat is older than the cutoff is stopped, its
        sessions closed and its leases back in the queue; a running node's
        stay as they are.
        """
        yield self.store.register_node(self.node("dead", heartbeat_at=NOW))
        yield self.store.register_node(self.node("alive", heartbeat_at=NOW + 30 * SECOND))
        yield self.store.register_node(self.node("me", heartbeat_at=NOW + 30 * SECOND))
        gone = yield self.openOn("dead")
        kept = yield self.openOn("alive")
        mine = yield self.openOn("me")
        message = yield self.leaseTo(gone)
        reaped = yield self.store.reap_nodes("me", "me", NOW + 10 * SECOND, NOW + 31 * SECOND)
        self.assertEqual(reaped, [ReapedSession("dead", self.mesh.id, gone.presence_id,
                                                self.alice.id)])
        self.assertEqual((yield self.queued()), [message.id])
        open_ids = {s.presence_id for s in (yield self.store.list_open_sessions(self.mesh.id))}
        self.assertEqual(open_ids, {kept.presence_id, mine.presence_id})
        self.assertEqual(sorted(n.id for n in (yield self.store.running_nodes(0))),
                         ["alive", "me"])
        # Nothing more to do the second time.
        self.assertEqual(
            (yield self.store.reap_nodes("me", "me", NOW + 10 * SECOND, NOW + 32 * SECOND)), [])

    @defer.inlineCallbacks
    def test_reap_previous_process_of_same_name(self):
        """A restart under the same name closes its previous process's sessions at once."""
        yield self.store.register_node(self.node("old", name="host:7900"))
        yield self.store.register_node(self.node("new", name="host:7900"))
        yield self.store.register_node(self.node("other", name="host:7901"))
        previous = yield self.openOn("old")
        yield self.openOn("other")
        reaped = yield self.store.reap_nodes("new", "host:7900", NOW - 30 * SECOND, NOW)
        self.assertEqual([r.presence_id for r in reaped], [previous.presence_id])

    @defer.inlineCallbacks
    def test_reap_orphans(self):
        """Sessions of no running node (a broker from before nodes, an unknown id) are closed."""
        yield self.store.register_node(self.node("me"))
        before_nodes = yield self.openOn("")
        unknown = yield self.openOn("never-registered")
        reaped = yield self.store.reap_nodes("me", "me", NOW - 30 * SECOND, NOW)
        self.assertEqual(sorted(r.presence_id for r in reaped),
                         sorted([before_nodes.presence_id, unknown.presence_id]))

    @defer.inlineCallbacks
    def test_signature_used_once(self):
        """
        A signed credential is recorded once: a second use before its expiry
        is refused, concurrent uses admit exactly one, and after the expiry
        it may be used again (and the sweep forgets it).
        """
        use = self.store.use_signature
        self.assertTrue((yield use("hello", "k1", "sig", NOW + 60 * SECOND, NOW)))
        self.assertFalse((yield use("hello", "k1", "sig", NOW + 60 * SECOND, NOW + 1)))
        self.assertTrue((yield use("hook", "k1", "sig", NOW + 60 * SECOND, NOW)))
        results = yield defer.gatherResults(
            [use("join", "k2", "sig2", NOW + 60 * SECOND, NOW) for _ in range(5)])
        self.assertEqual(sorted(results), [False] * 4 + [True])
        self.assertTrue((yield use("hello", "k1", "sig", NOW + 200 * SECOND, NOW + 61 * SECOND)))
        self.assertEqual((yield self.store.forget_signatures(NOW + 70 * SECOND)), 2)

    @defer.inlineCallbacks
    def test_notices_in_a_batch(self):
        """A batch carrying notices commits like any other (SQLite: nothing to send)."""
        session = self.makeSession(self.mesh, self.alice, node_id="n1")
        outcome = yield self.store.write_batch(WriteBatch(
            opens=(session,), notices=(Notice("n1", "wake", self.mesh.id, {"u": ["a"]}),)))
        self.assertEqual(outcome.enqueued, [])
        yield self.store.notify([Notice("n1", "mesh", self.mesh.id)])


class SQLiteNodeStoreTests(NodeStoreTestsMixin, TestCase):
    """
    On L{SQLiteStore} in adbapi's thread.
    """

    def makeStore(self):
        path = os.path.join(self.mktemp() + ".d", "store.sqlite3")
        os.makedirs(os.path.dirname(path))
        return SQLiteStore(path, reactor)

    def test_second_process_refused(self):
        """A second claim on one SQLite file is refused, naming the holder's pid and Postgres."""
        path = os.path.join(self.mktemp() + ".d", "store.sqlite3")
        os.makedirs(os.path.dirname(path))
        first, second = SQLiteStore(path, reactor), SQLiteStore(path, reactor)
        first.claim_process()
        self.addCleanup(first.release_process)
        error = self.assertRaises(DatabaseInUse, second.claim_process)
        self.assertIn("pid %d" % (os.getpid(),), str(error))
        self.assertIn("PostgreSQL", str(error))
        first.release_process()
        second.claim_process()
        second.release_process()


class InlineSQLiteNodeStoreTests(NodeStoreTestsMixin, TestCase):
    """
    On L{SQLiteStore.inline}, the store of the core's unit tests.
    """

    def makeStore(self):
        return SQLiteStore.inline()


class PostgresNodeStoreTests(NodeStoreTestsMixin, TestCase):
    """
    On L{PostgresStore}, a new schema per test.
    """

    skip = PG_SKIP

    def makeStore(self):
        self.schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, self.schema)
        return PostgresStore(PG_DSN, self.schema, reactor)

    @defer.inlineCallbacks
    def listen(self):
        received = []
        rescans = []
        backplane = PostgresBackplane(PG_DSN, self.schema, reactor)
        yield backplane.start(received.append, lambda: rescans.append(True))
        self.addCleanup(backplane.stop)
        return backplane, received, rescans

    @defer.inlineCallbacks
    def waitFor(self, predicate, seconds=10.0):
        for _ in range(int(seconds * 20)):
            if predicate():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("timed out waiting")

    @defer.inlineCallbacks
    def test_notice_sent_on_commit(self):
        """A notice in a committed batch reaches a listening node, wake-ups folded per mesh."""
        backplane, received, _ = yield self.listen()
        yield self.store.write_batch(WriteBatch(notices=(
            Notice("n1", "wake", self.mesh.id, {"u": ["a", "b"]}),
            Notice("n1", "wake", self.mesh.id, {"u": ["b", "c"]}),
            Notice("n1", "end", self.mesh.id, {"p": ["x"], "c": 4001}))))
        yield self.waitFor(lambda: len(received) == 2)
        self.assertEqual(sorted((n.kind, n.data) for n in received), [
            ("end", {"p": ["x"], "c": 4001}), ("wake", {"u": ["a", "b", "c"]})])

    @defer.inlineCallbacks
    def test_no_notice_from_a_rolled_back_batch(self):
        """A batch that fails sends nothing: the notice never outruns its change."""
        backplane, received, _ = yield self.listen()
        session = self.makeSession(self.mesh, self.alice)
        bad = self.makeSession(self.mesh, self.alice, status="asleep")
        yield self.assertFailure(self.store.write_batch(WriteBatch(
            opens=(session, bad), notices=(Notice("n1", "mesh", self.mesh.id),))), Exception)
        yield self.store.notify([Notice("n1", "after", self.mesh.id)])
        yield self.waitFor(lambda: received)
        self.assertEqual([n.kind for n in received], ["after"])

    @defer.inlineCallbacks
    def test_listener_dropped_and_back(self):
        """
        The listening connection ended by the server comes back, listens
        again and asks for a re-scan; later notices arrive.
        """
        backplane, received, rescans = yield self.listen()
        pid = backplane.backend_pid()
        self.assertIsNotNone(pid)
        pg.run(PG_DSN, "SELECT pg_terminate_backend(%s)", (pid,))
        yield self.waitFor(lambda: rescans, seconds=20)
        self.assertNotEqual(backplane.backend_pid(), pid)
        yield self.store.notify([Notice("n1", "mesh", self.mesh.id)])
        yield self.waitFor(lambda: received, seconds=10)
        self.assertEqual(backplane.reconnections, 1)
        # One warning line, no traceback.
        self.assertEqual(self.flushLoggedErrors(psycopg2.OperationalError), [])


class NoticeWireTests(SynchronousTestCase):
    """
    L{notices.payloads} and L{notices.decode}.
    """

    def test_round_trip(self):
        """A notice survives its payload."""
        notice = Notice("n1", "end", "m1", {"p": ["a"], "c": 4001, "r": "kicked"})
        [payload] = notices.payloads([notice])
        self.assertEqual(notices.decode(payload), notice)

    def test_wakes_split_under_the_limit(self):
        """Wake-ups of very many members are split into payloads Postgres accepts."""
        members = ["%032x" % i for i in range(1000)]
        payloads = notices.payloads([Notice("n1", "wake", "m1", {"u": members})])
        self.assertGreater(len(payloads), 1)
        self.assertTrue(all(len(p.encode("utf-8")) < 8000 for p in payloads))
        back = [m for p in payloads for m in notices.decode(p).data["u"]]
        self.assertEqual(back, members)

    def test_garbage_ignored(self):
        """A payload this broker cannot read is no notice."""
        for payload in ("", "{", "[]", '{"o":1}', '{"o":"a","k":"b","m":"c","d":[]}'):
            self.assertIsNone(notices.decode(payload))
