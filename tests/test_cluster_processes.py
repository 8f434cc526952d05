"""
Integration tests of a cluster (issue 15): real C{twistd claudemesh-broker}
processes on loopback sharing one Postgres database — three nodes on their
own ports, and C{--workers 2} on one port — with WebSocket clients from the
soak harness: cross-node DMs, broadcasts and groups; presence and
C{list_peers}; replacement; kick and ban with their close codes; the hook
for a session on another node; C{kill -9} of a node with redelivery; the
C{NOTIFY} connections dropped; SQLite refusing C{--workers 2}.

Each test class works in a database of its own, dropped afterwards; every
process and connection is gone when each test ends.
"""

import atexit
import json
import os
import random
import subprocess

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from claudemesh import crypto
from soak.harness import (
    BrokerProcess,
    Peer,
    TemporaryPostgres,
    bootstrap_mesh,
    broker_environment,
    find_initdb,
    free_port,
    http,
    now_ms,
    sleep,
    twistd_command,
)
from tests import pg
from tests.test_store import PG_DSN, PG_SKIP


def create_database(maintenance_dsn):
    """
    A new database for one test class; returns its DSN and a function that
    drops it.
    """
    name = "claudemesh_cluster_%d_%06x" % (os.getpid(), random.getrandbits(24))
    pg.run(maintenance_dsn, 'CREATE DATABASE "%s"' % (name,))
    dsn = _dsn(maintenance_dsn, name)
    dropped = []

    def drop():
        if not dropped:
            dropped.append(True)
            pg.run(maintenance_dsn, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % (name,))

    # trial does not run tearDownClass: the process's exit drops it for sure.
    atexit.register(drop)
    return dsn, drop


def _dsn(dsn, dbname):
    import psycopg2.extensions

    return psycopg2.extensions.make_dsn(dsn, dbname=dbname)


def as_url(dsn):
    """
    The DSN as the C{postgresql://} URL C{DATABASE_URL} takes.
    """
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    host = params.get("host", "127.0.0.1")
    if host.startswith("/"):
        host = "127.0.0.1"
    return "postgresql://%s@%s:%s/%s" % (params.get("user", "postgres"), host,
                                         params.get("port", "5432"), params["dbname"])


@defer.inlineCallbacks
def wait_until(condition, timeout=15.0, what="a condition"):
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))
        yield sleep(reactor, 0.05)


def events(peer, name):
    """
    The system events C{name} C{peer} received so far (a wait registered
    after one arrived would miss it).
    """
    return [e for e in peer.events if e.get("event") == name]


def closed(peer, timeout=30.0):
    """
    How C{peer}'s connection closed (C{(clean, code, reason)}), within
    C{timeout} seconds.
    """
    d = defer.Deferred()

    def passed(result):
        if not d.called:
            d.callback(result)
        return result

    peer.client.closed.addBoth(passed)
    return d.addTimeout(timeout, reactor)


class ClusterProcessMixin:
    """
    Starts brokers on one database and cleans up after them.
    """

    skip = PG_SKIP
    database = None

    def setUp(self):
        cls = type(self)
        if cls.database is None:
            # Dropped when the test process exits.
            cls.database, _ = create_database(PG_DSN)
        self.url = as_url(cls.database)
        # One schema per test: a fresh cluster each time.
        self.schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, cls.database, self.schema)
        self.peers = []
        self.addCleanup(self._close_peers)

    @defer.inlineCallbacks
    def _close_peers(self):
        for peer in self.peers:
            yield peer.close()

    def broker(self, name, *args, port=None):
        workdir = self.mktemp()
        os.makedirs(workdir)
        process = BrokerProcess(reactor, workdir, port=port, args=[
            "--node-name", name, "--hello-rate-per-ip", "0", "--send-rate-limit-per-min", "0",
            "--database-schema", self.schema] + list(args),
            env={"DATABASE_URL": self.url})
        self.addCleanup(process.cleanup)
        return process

    @defer.inlineCallbacks
    def peer(self, member, node, session_id="main", **hello):
        peer = Peer(reactor, member, node.url)
        self.peers.append(peer)
        yield peer.connect(session_id=session_id, **hello)
        return peer

    def texts(self, peer):
        return sorted(peer.received)


class ThreeNodeTests(ClusterProcessMixin, TestCase):
    """
    Three broker processes on their own ports, one database.
    """

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        ClusterProcessMixin.setUp(self)
        self.nodes = [self.broker("node%d" % (i,)) for i in range(3)]
        for node in self.nodes:
            yield node.start(timeout=60)
        self.members = yield bootstrap_mesh(reactor, self.nodes[0].http, self.nodes[0].url,
                                            ["alice", "bob", "carol"])

    @defer.inlineCallbacks
    def test_messages_presence_and_peers(self):
        """
        DMs, a broadcast and a group message reach peers on other nodes;
        presence events and peers_list are cluster-wide.
        """
        m = self.members
        alice = yield self.peer(m["alice"], self.nodes[0])
        bob = yield self.peer(m["bob"], self.nodes[1], groups=[{"name": "ops"}])
        yield wait_until(lambda: events(alice, "peer_joined"), what="bob's peer_joined")
        carol = yield self.peer(m["carol"], self.nodes[2])
        for i in range(20):
            alice.send_dm(m["bob"], "a-b-%d" % (i,), "ab%d" % (i,))
        carol.send_dm(m["alice"], "c-a", "ca")
        yield wait_until(lambda: len(bob.received) == 20 and alice.received, what="DMs")
        self.assertEqual(bob.pushes, 20)
        order = sorted(bob.received, key=bob.received.get)
        self.assertEqual(order, ["a-b-%d" % (i,) for i in range(20)])
        for target in ("*", "@ops"):
            nonce, ciphertext = crypto.encrypt_broadcast(b"k" * 32, target.encode())
            alice.client.send_frame({"type": "send", "targetSpec": target, "priority": "next",
                                     "nonce": nonce, "ciphertext": ciphertext})
        yield wait_until(lambda: bob.pushes == 22 and carol.pushes == 1, what="broadcasts")
        reply = yield carol.request({"type": "list_peers"})
        self.assertEqual(sorted(p["displayName"] for p in reply["peers"]),
                         ["alice", "bob", "carol"])
        yield bob.close()
        yield wait_until(lambda: events(carol, "peer_left"), what="bob's peer_left")
        self.assertEqual(events(carol, "peer_left")[0]["eventData"]["name"], "bob")

    @defer.inlineCallbacks
    def test_replacement_kick_and_ban(self):
        """
        A session taken over through another node closes 1000
        session_replaced; a kick and a ban from one node close sessions on
        the others with 4001 and 4002 (after error revoked).
        """
        m = self.members
        owner = yield self.peer(m["owner"], self.nodes[0], session_id="owner")
        first = yield self.peer(m["alice"], self.nodes[1], session_id="a")
        again = yield self.peer(m["alice"], self.nodes[2], session_id="a")
        closed_as = yield closed(first)
        self.assertEqual(closed_as[1:], (1000, "session_replaced"))
        bob = yield self.peer(m["bob"], self.nodes[1])
        carol = yield self.peer(m["carol"], self.nodes[2])
        yield wait_until(lambda: len([e for e in owner.events
                                      if e.get("event") == "peer_joined"]) >= 3,
                         what="joins at the owner's node")
        reply = yield owner.request({"type": "kick", "target": "bob"})
        self.assertEqual(reply["kicked"], ["bob"])
        self.assertEqual((yield closed(bob))[1], 4001)
        reply = yield owner.request({"type": "ban", "target": "carol"})
        self.assertEqual(reply["type"], "ban_ack")
        self.assertEqual((yield closed(carol))[1:], (4002, "banned"))
        self.assertEqual([e["code"] for e in carol.errors], ["revoked"])
        self.assertTrue(again.open)

    @defer.inlineCallbacks
    def test_hook_for_session_elsewhere(self):
        """POST /hook/set-status at one node sets a session's status on another."""
        m = self.members
        alice = yield self.peer(m["alice"], self.nodes[0])
        yield self.peer(m["bob"], self.nodes[2], session_id="bob-session")
        yield wait_until(lambda: any(e.get("event") == "peer_joined" for e in alice.events))
        body = {"status": "working", "session_id": "bob-session"}
        raw = json.dumps(body).encode("utf-8")
        timestamp = now_ms(reactor)
        code, answer = yield http(reactor, "POST", self.nodes[1].http + "/hook/set-status",
                                  body, headers={
                                      "X-Claudemesh-Mesh": m["bob"].mesh_id,
                                      "X-Claudemesh-Pubkey": m["bob"].pubkey,
                                      "X-Claudemesh-Timestamp": str(timestamp),
                                      "X-Claudemesh-Signature": m["bob"].identity.sign(
                                          crypto.hook_string(m["bob"].mesh_id, timestamp,
                                                             raw))})
        self.assertEqual((code, answer["ok"]), (200, True))

        @defer.inlineCallbacks
        def bob_status():
            reply = yield alice.request({"type": "list_peers"})
            return [p["status"] for p in reply["peers"] if p["displayName"] == "bob"]

        for _ in range(100):
            if (yield bob_status()) == ["working"]:
                break
            yield sleep(reactor, 0.1)
        self.assertEqual((yield bob_status()), ["working"])

    @defer.inlineCallbacks
    def test_kill_9_redelivers(self):
        """
        kill -9 of the recipient's node with pushes unacknowledged: the
        others say peer_left within 30 s, and the recipient coming back
        through another node gets every message — none lost.
        """
        m = self.members
        alice = yield self.peer(m["alice"], self.nodes[0])
        watcher = yield self.peer(m["carol"], self.nodes[2])
        bob = yield self.peer(m["bob"], self.nodes[1])
        bob.auto_ack = False
        for i in range(10):
            alice.send_dm(m["bob"], "k-%d" % (i,), "k%d" % (i,))
        yield wait_until(lambda: len(bob.received) == 10, what="pushes before the kill")
        killed_at = reactor.seconds()
        yield self.nodes[1].kill()
        yield wait_until(lambda: events(watcher, "peer_left"), 30, "bob's peer_left")
        self.assertLess(reactor.seconds() - killed_at, 30)
        back = yield self.peer(m["bob"], self.nodes[2], session_id="back")
        yield wait_until(lambda: len(back.received) == 10, timeout=20, what="redelivery")
        self.assertEqual(self.texts(back), ["k-%d" % (i,) for i in range(10)])
        # The killed node restarts under its name: it releases only its own.
        yield self.nodes[1].start(timeout=60)
        alice.send_dm(m["bob"], "after", "after")
        yield wait_until(lambda: "after" in back.received, what="a DM after the restart")
        self.assertTrue(watcher.open)

    @defer.inlineCallbacks
    def test_notify_connections_dropped(self):
        """
        The listening connections ended by the server: each node listens
        again and re-scans; what was sent meanwhile and after is delivered.
        """
        m = self.members
        alice = yield self.peer(m["alice"], self.nodes[0])
        bob = yield self.peer(m["bob"], self.nodes[1])
        rows = pg.run(self.database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE application_name = 'claudemesh-listen'"
                      " AND datname = current_database()")
        self.assertEqual(len(rows), 3)
        alice.send_dm(m["bob"], "during", "during")
        yield wait_until(lambda: "during" in bob.received, timeout=30, what="the re-scan")
        alice.send_dm(m["bob"], "after", "after")
        yield wait_until(lambda: "after" in bob.received, timeout=15, what="listening again")
        yield wait_until(lambda: "re-scanning" in self.nodes[1].log_text(),
                         what="the re-scan in the log")
        self.assertNotIn("Unhandled Error", self.nodes[1].log_text())


class WorkersTests(ClusterProcessMixin, TestCase):
    """
    C{--workers 2}: one port, two processes.
    """

    timeout = 180

    @defer.inlineCallbacks
    def test_workers_share_a_port(self):
        """
        Two workers behind one port: peers on both exchange messages, a
        dead worker is started again, and SIGTERM closes every session with
        1001 and ends every process.
        """
        node = self.broker("box", "--workers", "2")
        yield node.start(timeout=60)
        members = yield bootstrap_mesh(reactor, node.http, node.url,
                                       ["p%d" % (i,) for i in range(6)])
        peers = []
        for i in range(6):
            peers.append((yield self.peer(members["p%d" % (i,)], node)))
        for i, peer in enumerate(peers):
            peer.send_dm(members["p%d" % ((i + 1) % 6,)], "w-%d" % (i,), "w%d" % (i,))
        yield wait_until(lambda: all(len(p.received) == 1 for p in peers), what="DMs")
        nodes = pg.run(self.database, 'SELECT name FROM "%s".nodes WHERE stopped_at IS NULL'
                       % (self.schema,))
        self.assertEqual(sorted(n for (n,) in nodes), ["box/w1", "box/w2"])
        status = yield node.terminate(timeout=30)
        self.assertEqual(status[:2], (0, None))
        for peer in peers:
            self.assertEqual((yield closed(peer))[1], 1001)
        left = pg.run(self.database, 'SELECT count(*) FROM "%s".nodes WHERE stopped_at IS NULL'
                      % (self.schema,))
        self.assertEqual(left, [(0,)])


class OutageTests(TestCase):
    """
    A Postgres outage under a cluster, on a server of the test's own.
    """

    timeout = 240
    skip = None if find_initdb() else "initdb not found (install PostgreSQL server binaries)"

    @defer.inlineCallbacks
    def test_outage_heals_every_node(self):
        """
        The database stops: every node's /health/ready turns 503; it comes
        back: every node is ready again without a restart, listening again,
        and a DM across nodes is delivered.
        """
        server = TemporaryPostgres(reactor)
        self.addCleanup(server.destroy)
        yield server.create()
        nodes, peers = [], []
        for i in range(2):
            workdir = self.mktemp()
            os.makedirs(workdir)
            node = BrokerProcess(reactor, workdir, args=[
                "--node-name", "n%d" % (i,), "--hello-rate-per-ip", "0"],
                env={"DATABASE_URL": server.url})
            self.addCleanup(node.cleanup)
            yield node.start(timeout=60)
            nodes.append(node)
        members = yield bootstrap_mesh(reactor, nodes[0].http, nodes[0].url, ["alice", "bob"])
        alice = Peer(reactor, members["alice"], nodes[0].url)
        bob = Peer(reactor, members["bob"], nodes[1].url)
        peers += [alice, bob]
        self.addCleanup(lambda: defer.gatherResults([p.close() for p in peers]))
        yield alice.connect()
        yield bob.connect()

        @defer.inlineCallbacks
        def ready_codes():
            codes = []
            for node in nodes:
                code, _ = yield http(reactor, "GET", node.http + "/health/ready", timeout=3)
                codes.append(code)
            return codes

        @defer.inlineCallbacks
        def wait_for_codes(wanted, seconds):
            deadline = reactor.seconds() + seconds
            while (yield ready_codes()) != wanted:
                if reactor.seconds() > deadline:
                    self.fail("readiness never became %r" % (wanted,))
                yield sleep(reactor, 0.5)

        yield server.stop()
        yield wait_for_codes([503, 503], 30)
        yield server.start()
        yield wait_for_codes([200, 200], 60)
        yield wait_until(lambda: all("re-scanning" in n.log_text() for n in nodes), 60,
                         "every node listening again")
        alice.send_dm(members["bob"], "after the outage", "o1")
        yield wait_until(lambda: "after the outage" in bob.received, 30, "the DM")


class SQLiteWorkersTests(TestCase):
    """
    SQLite serves one process.
    """

    def test_workers_refused(self):
        """twistd claudemesh-broker --workers 2 on SQLite exits at once naming PostgreSQL."""
        data_dir = self.mktemp()
        result = subprocess.run(
            twistd_command() + ["-n", "--pidfile=", "claudemesh-broker", "--workers", "2",
                                "--data-dir", data_dir, "--port",
                                "tcp:%d:interface=127.0.0.1" % (free_port(),)],
            env=broker_environment(), capture_output=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        self.assertIn("PostgreSQL", output)
        self.assertIn("--workers 2", output)
