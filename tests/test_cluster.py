"""
Unit tests of L{claudemesh.broker.cluster} (issue 15): nodes of one cluster
in one process, on one inline SQLite store, one L{task.Clock} and one
L{LocalHub} (the in-memory backplane), so no global reactor and no
Postgres: node start-up, heartbeat, a dead node's sessions reaped, and
notices between nodes.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from claudemesh import crypto, protocol
from claudemesh.broker import cluster
from claudemesh.broker.cluster import HEARTBEAT_SECONDS, NODE_TIMEOUT_SECONDS, LocalHub
from claudemesh.broker.presence import HELLO_COMMIT_WAIT
from claudemesh.store.records import NodeRecord, SessionRecord
from tests.meshfixture import BrokerFixture, FakeConnection, Peer, inline_store, result_of


class ClusterFixture:
    """
    Several nodes (L{BrokerFixture}s) sharing a store, a clock and a hub.
    """

    def __init__(self, count=2, **settings):
        self.store = inline_store()
        self.nodes = []
        first = BrokerFixture(store=self.store, node_name="node0", **settings)
        self.clock = first.clock
        self.hub = LocalHub(self.clock)
        # The first fixture's broker was built alone: rebuild it on the hub.
        self.nodes = [BrokerFixture(store=self.store, clock=self.clock,
                                    backplane=self.hub.backplane(), node_name="node%d" % i,
                                    **settings) for i in range(count)]
        first.broker.stopService()
        for node in self.nodes:
            result_of(node.broker.store_opened())
        self.flush()

    def flush(self):
        for node in self.nodes:
            node.flush()
        self.nodes[0].flush()

    def advance(self, seconds):
        step = 1.0
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            for _ in range(3):
                self.flush()

    def peer_on(self, node, peer):
        """
        The same member identity, connecting through another node (its
        hellos signed later than the other's: a hello is good once on every
        node).
        """
        other = Peer(self.nodes[node], peer.mesh, peer.member, peer.identity)
        other.session_identity = peer.session_identity
        other._last_hello = max(peer._last_hello, self.nodes[node].now_ms()) + 1000
        return other


def open_sessions(store, mesh_id):
    return result_of(store.list_open_sessions(mesh_id))


class StartTests(SynchronousTestCase):
    """
    What a node does when its store opens.
    """

    def test_alone_closes_everything(self):
        """A node alone (SQLite) closes every session a previous run left open."""
        fx = BrokerFixture()
        owner = fx.create_mesh()
        result_of(fx.store.open_sessions([SessionRecord(
            "p-old", owner.mesh.id, owner.member.id, "s", "x", 1, "/", fx.now_ms(),
            node_id="someone")]))
        result_of(fx.broker.store_opened())
        self.assertEqual(open_sessions(fx.store, owner.mesh.id), [])
        fx.broker.stopService()

    def test_clustered_keeps_running_nodes_sessions(self):
        """
        A node joining a cluster closes its previous process's sessions (same
        name) and dead nodes', never a running node's.
        """
        fx = ClusterFixture(2)
        owner = fx.nodes[0].create_mesh()
        now = fx.nodes[0].now_ms()
        result_of(fx.store.register_node(NodeRecord("old", "node2", "h", 1, now, now)))
        result_of(fx.store.open_sessions([
            SessionRecord("p-old", owner.mesh.id, owner.member.id, "s1", "x", 1, "/", now,
                          node_id="old"),
            SessionRecord("p-live", owner.mesh.id, owner.member.id, "s2", "x", 1, "/", now,
                          node_id=fx.nodes[1].broker.cluster.node_id)]))
        third = BrokerFixture(store=fx.store, clock=fx.clock, backplane=fx.hub.backplane(),
                              node_name="node2")
        result_of(third.broker.store_opened())
        fx.flush()
        self.assertEqual([s.presence_id for s in open_sessions(fx.store, owner.mesh.id)],
                         ["p-live"])
        third.broker.stopService()


class HeartbeatTests(SynchronousTestCase):
    """
    Heartbeats and dead nodes.
    """

    def test_heartbeat_moves(self):
        """Each running node refreshes its heartbeat every few seconds."""
        fx = ClusterFixture(2)
        fx.advance(HEARTBEAT_SECONDS * 3)
        now = fx.nodes[0].now_ms()
        running = result_of(fx.store.running_nodes(now - int(HEARTBEAT_SECONDS * 1000) - 1))
        self.assertEqual(sorted(n.name for n in running), ["node0", "node1"])

    def test_dead_node_reaped(self):
        """
        A node that stops beating (kill -9) has its sessions closed by a
        survivor within the timeout, and every node hears that they are
        gone; a node that stops cleanly says so and is not reaped.
        """
        fx = ClusterFixture(2)
        owner = fx.nodes[0].create_mesh()
        peer = fx.peer_on(1, owner)
        peer.connect()
        self.assertEqual(len(open_sessions(fx.store, owner.mesh.id)), 1)
        heard = []
        fx.nodes[0].broker.cluster.on("gone", heard.append)
        # node1 dies: its timers stop, nothing is written any more.
        dead = fx.nodes[1].broker.cluster
        dead._started = False
        dead._heartbeat.cancel()
        fx.hub.leave(dead.backplane)
        fx.advance(NODE_TIMEOUT_SECONDS + 2 * HEARTBEAT_SECONDS)
        self.assertEqual(open_sessions(fx.store, owner.mesh.id), [])
        self.assertEqual([(n.kind, n.data["n"]) for n in heard], [("gone", dead.node_id)])

    def test_found_dead_reopens(self):
        """A node taken for dead (a stall) records its live sessions again at its next beat."""
        fx = ClusterFixture(1)
        owner = fx.nodes[0].create_mesh()
        owner.connect()
        node = fx.nodes[0].broker.cluster
        result_of(fx.store.stop_node(node.node_id, fx.nodes[0].now_ms()))
        result_of(fx.store.close_sessions([owner.session.presence_id], fx.nodes[0].now_ms()))
        fx.advance(HEARTBEAT_SECONDS + 1)
        self.assertEqual([s.presence_id for s in open_sessions(fx.store, owner.mesh.id)],
                         [owner.session.presence_id])


class LocalHubTests(SynchronousTestCase):
    """
    The in-memory backplane.
    """

    def test_next_turn_to_others_only(self):
        """A committed notice reaches the other backplanes on the next turn, not its sender."""
        fx = ClusterFixture(3)
        heard = {i: [] for i in range(3)}
        for i, node in enumerate(fx.nodes):
            node.broker.cluster.on("test", heard[i].append)
        fx.nodes[0].broker.cluster.notice("test", "m1", x=1)
        fx.flush()
        self.assertEqual([len(heard[i]) for i in range(3)], [0, 1, 1])
        self.assertEqual(heard[1][0].data, {"x": 1})

    def test_alone_sends_nothing(self):
        """A node alone queues no notices at all."""
        fx = BrokerFixture()
        self.assertFalse(fx.broker.cluster.clustered)
        fx.broker.cluster.notice("test", "m1")
        self.assertEqual(fx.broker.writes._queued["notice"], [])
        self.assertTrue(cluster.LocalBackplane().single_process)


class CrossNodeTests(SynchronousTestCase):
    """
    What a peer sees and does, with its peers on other nodes: the same
    frames, codes and strings as on one node.
    """

    def setUp(self):
        self.fx = ClusterFixture(3, send_rate_limit_per_min=0)
        node0 = self.fx.nodes[0]
        self.owner = node0.create_mesh()
        self.alice = node0.add_member(self.owner, "alice")
        self.bob = self.fx.peer_on(1, node0.add_member(self.owner, "bob"))
        self.carol = self.fx.peer_on(2, node0.add_member(self.owner, "carol"))

    def connect(self, *peers, **kwargs):
        for peer in peers:
            peer.connect(**kwargs)
            self.fx.flush()

    def test_direct_message(self):
        """A DM to a member whose session is on another node is claimed and pushed there."""
        self.connect(self.alice, self.bob)
        ack = self.alice.send(self.bob.pubkey, b"hi bob")
        self.fx.flush()
        self.assertTrue(ack["queued"])
        [push] = self.bob.connection.messages()
        self.assertEqual(push["senderMemberPubkey"], self.alice.pubkey)
        self.bob.ack_all()
        self.fx.flush()
        status = self.alice.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual([r["status"] for r in status["recipients"]], ["delivered"])

    def test_session_key_message(self):
        """A DM to a session key held on another node reaches that session."""
        self.connect(self.alice)
        self.connect(self.bob, session_key=True)
        self.alice.send(self.bob.session_identity.pubkey, b"to your session")
        self.fx.flush()
        self.assertEqual(len(self.bob.connection.messages()), 1)

    def test_broadcast_and_group(self):
        """A broadcast reaches every node; a group message only its members, wherever they are."""
        self.connect(self.alice)
        self.connect(self.bob, groups=[{"name": "ops"}])
        self.connect(self.carol)
        self.alice.send("*", b"all")
        self.alice.send("@ops", b"ops only")
        self.fx.flush()
        self.assertEqual([p["targetSpec"] for p in self.bob.connection.messages()],
                         ["*", "@ops"])
        self.assertEqual([p["targetSpec"] for p in self.carol.connection.messages()], ["*"])

    def test_order_across_nodes(self):
        """Many DMs to a peer on another node arrive once each, in the order sent."""
        self.connect(self.alice, self.bob)
        ids = [self.alice.send(self.bob.pubkey, b"m%d" % i)["messageId"] for i in range(30)]
        self.fx.flush()
        self.bob.ack_all()
        self.fx.flush()
        self.assertEqual([p["messageId"] for p in self.bob.connection.messages()], ids)

    def test_presence_and_peers_list(self):
        """Peers on other nodes are announced, listed, and their departure heard."""
        self.connect(self.alice)
        self.connect(self.bob)
        [joined] = self.alice.connection.events("peer_joined")
        self.assertEqual(joined["eventData"]["name"], "bob")
        self.connect(self.carol)
        peers = self.alice.request({"type": "list_peers"})["peers"]
        self.assertEqual(sorted(p["displayName"] for p in peers), ["alice", "bob", "carol"])
        self.bob.leave()
        self.fx.flush()
        [left] = self.alice.connection.events("peer_left")
        self.assertEqual(left["eventData"]["name"], "bob")
        self.assertEqual([e["eventData"]["name"] for e in self.carol.connection.events(
            "peer_left")], ["bob"])
        peers = self.alice.request({"type": "list_peers"})["peers"]
        self.assertEqual(sorted(p["displayName"] for p in peers), ["alice", "carol"])

    def test_status_seen_elsewhere(self):
        """A status change on one node shows in peers_list and to watchers on the others."""
        self.connect(self.alice)
        watcher = self.fx.peer_on(2, self.owner)
        self.connect(watcher, watch=True, session_id="ui")
        self.connect(self.bob)
        self.bob.request({"type": "set_status", "status": "working", "source": "manual"})
        self.fx.flush()
        [peer] = [p for p in self.alice.request({"type": "list_peers"})["peers"]
                  if p["displayName"] == "bob"]
        self.assertEqual(peer["status"], "working")
        statuses = [e["eventData"]["status"] for e in watcher.connection.events("peer_status")
                    if e["eventData"]["displayName"] == "bob"]
        self.assertEqual(statuses[-1], "working")

    def test_replacement_across_nodes(self):
        """A hello on another node with the same session takes it over: 1000 session_replaced."""
        self.connect(self.alice)
        bob_here = self.fx.peer_on(0, self.bob)
        self.connect(bob_here)
        first = bob_here.connection
        self.alice.connection.clear()
        ack = self.bob.connect()
        self.fx.flush()
        self.assertTrue(ack.get("restored"))
        self.assertEqual(first.closed, (1000, "session_replaced"))
        self.assertEqual(self.alice.connection.events(), [])
        peers = self.alice.request({"type": "list_peers"})["peers"]
        self.assertEqual([p["displayName"] for p in peers].count("bob"), 1)
        self.alice.send(self.bob.pubkey)
        self.fx.flush()
        self.assertEqual(len(self.bob.connection.messages()), 1)

    def test_kick_and_ban_across_nodes(self):
        """A kick or ban on one node closes the target's session on another with its code."""
        self.connect(self.owner, self.bob, self.carol)
        reply = self.owner.request({"type": "kick", "target": "bob"})
        self.fx.flush()
        self.assertEqual(reply["kicked"], ["bob"])
        self.assertEqual(self.bob.connection.closed[0], protocol.CLOSE_KICKED)
        self.owner.request({"type": "ban", "target": "carol"})
        self.fx.flush()
        self.assertEqual(self.carol.connection.closed,
                         (protocol.CLOSE_BANNED, protocol.REASON_BANNED))
        [error] = self.carol.connection.of_type("error")
        self.assertEqual(error["code"], "revoked")
        # Banned on every node: a new hello through node 2 is refused.
        refusal = self.assertRaises(protocol.Refusal, self.carol.connect)
        self.assertEqual(refusal.code, "revoked")

    def test_join_elsewhere_then_hello(self):
        """A member who joined a moment ago through another node is known at its hello."""
        self.connect(self.alice)
        dave = self.fx.nodes[1].add_member(self.owner, "dave")
        self.fx.hub.dropping = True
        dave_on0 = self.fx.peer_on(0, dave)
        ack = dave_on0.connect()
        self.fx.hub.dropping = False
        self.assertEqual(ack["memberDisplayName"], "dave")

    def test_hello_replayed_at_another_node(self):
        """A signed hello accepted by one node is refused as replayed by the others."""
        hello = self.bob.hello_dict(session_id="s9")
        results = []
        for node in (1, 2):
            connection = FakeConnection()
            d = self.fx.nodes[node].broker.presence.hello(
                connection, protocol.decode(json.dumps(hello)))
            d.addBoth(results.append)
            self.fx.flush()
        self.assertEqual(results[0][1]["type"], "hello_ack")
        self.assertEqual(results[1].value.code, "replayed")

    def test_hello_not_held_by_a_stuck_store(self):
        """
        A clustered hello waits for its row's commit, but not for ever: a
        store that stops answering writes holds it at most a moment.
        """
        self.connect(self.alice)
        node = self.fx.nodes[0]
        node.broker.writes._store = DeadStore()
        hello = self.owner.hello_dict(session_id="late")
        results = []
        node.broker.presence.hello(FakeConnection(), protocol.decode(json.dumps(hello))).addBoth(
            results.append)
        self.fx.flush()
        self.assertEqual(results, [])
        self.fx.clock.advance(HELLO_COMMIT_WAIT)
        self.assertEqual(results[0][1]["type"], "hello_ack")

    def test_own_sessions_elsewhere(self):
        """
        set_status, set_summary, join_group and leave_group with all or a
        sessionId reach the member's sessions on other nodes too.
        """
        self.connect(self.alice)
        other = self.fx.peer_on(1, self.alice)
        self.connect(other, session_id="s2")
        self.alice.request({"type": "set_status", "status": "dnd", "source": "manual",
                            "all": True})
        self.alice.request({"type": "set_summary", "summary": "both", "sessionId": "s2"})
        self.alice.request({"type": "join_group", "name": "ops", "all": True})
        self.fx.flush()
        remote = other.session
        self.assertEqual((remote.status.status, remote.summary, sorted(remote.groups)),
                         ("dnd", "both", ["ops"]))
        self.assertEqual(self.alice.session.status.status, "dnd")
        self.alice.request({"type": "leave_group", "name": "ops", "all": True})
        self.fx.flush()
        self.assertEqual(remote.groups, {})
        reply = self.alice.request({"type": "set_status", "status": "idle", "source": "manual",
                                    "sessionId": "nope"})
        self.assertEqual(reply.code, "not_found")

    def test_hook_for_session_elsewhere(self):
        """A signed hook report arriving at one node sets the status of a session on another."""
        self.connect(self.alice, self.bob)
        body = json.dumps({"status": "working", "session_id": "s1"}).encode()
        now = self.fx.nodes[0].now_ms()
        signature = self.bob.identity.sign(crypto.hook_string(self.bob.mesh.id, now, body))
        results = []
        self.fx.nodes[0].broker.hooks.report(self.bob.mesh.id, self.bob.pubkey, now, signature,
                                             body).addBoth(results.append)
        self.fx.flush()
        self.assertEqual(results[0]["ok"], True)
        self.assertEqual(self.bob.session.status.status, "working")

    def test_connection_limit_across_nodes(self):
        """The per-mesh connection limit counts every node's sessions."""
        fx = ClusterFixture(2, max_connections_per_mesh=2)
        owner = fx.nodes[0].create_mesh()
        alice = fx.peer_on(1, fx.nodes[0].add_member(owner, "alice"))
        bob = fx.nodes[0].add_member(owner, "bob")
        owner.connect()
        fx.flush()
        alice.connect()
        fx.flush()
        refusal = self.assertRaises(protocol.Refusal, bob.connect)
        self.assertEqual(refusal.code, "capacity")


class FailureTests(SynchronousTestCase):
    """
    A node that dies, and notices that are lost.
    """

    def setUp(self):
        self.fx = ClusterFixture(2)
        node0 = self.fx.nodes[0]
        self.owner = node0.create_mesh()
        self.alice = node0.add_member(self.owner, "alice")
        self.bob = self.fx.peer_on(1, node0.add_member(self.owner, "bob"))

    def kill(self, index):
        """
        The node stops dead: no heartbeat, no notices, nothing written.
        """
        node = self.fx.nodes[index]
        cluster = node.broker.cluster
        cluster._started = False
        if cluster._heartbeat is not None:
            cluster._heartbeat.cancel()
        self.fx.hub.leave(cluster.backplane)
        node.broker.writes._store = DeadStore()

    def test_dead_node_redelivers(self):
        """
        kill -9 of the recipient's node with a push unacknowledged: the
        survivor says peer_left within the timeout, and the session coming
        back through it gets the message again — nothing lost.
        """
        self.alice.connect()
        self.fx.flush()
        self.bob.connect()
        self.fx.flush()
        ack = self.alice.send(self.bob.pubkey, b"important")
        self.fx.flush()
        self.assertEqual(len(self.bob.connection.messages()), 1)
        self.kill(1)
        self.fx.advance(NODE_TIMEOUT_SECONDS + 2 * HEARTBEAT_SECONDS)
        self.assertEqual([e["eventData"]["name"] for e in self.alice.connection.events(
            "peer_left")], ["bob"])
        back = self.fx.peer_on(0, self.bob)
        back.connect()
        self.fx.flush()
        self.assertEqual([p["messageId"] for p in back.connection.messages()],
                         [ack["messageId"]])

    def test_reconnect_before_reaping(self):
        """A client that reconnects elsewhere before its dead node is found keeps its session."""
        self.alice.connect()
        self.fx.flush()
        self.bob.connect()
        self.fx.flush()
        self.alice.send(self.bob.pubkey, b"first")
        self.fx.flush()
        self.kill(1)
        back = self.fx.peer_on(0, self.bob)
        ack = back.connect()
        self.fx.flush()
        self.assertTrue(ack.get("restored"))
        self.assertEqual(len(back.connection.messages()), 1)

    def test_lost_notices_rescanned(self):
        """
        Notices lost (the listening connection dropped): after the re-scan
        the other node's newcomer is announced and its messages delivered.
        """
        self.alice.connect()
        self.fx.flush()
        self.fx.hub.dropping = True
        self.bob.connect()
        self.fx.flush()
        self.bob.send(self.alice.pubkey, b"while you were deaf")
        self.fx.flush()
        self.assertEqual(self.alice.connection.messages(), [])
        self.fx.hub.dropping = False
        self.fx.nodes[0].broker.cluster.rescan()
        self.fx.flush()
        self.assertEqual(len(self.alice.connection.messages()), 1)
        self.assertEqual([e["eventData"]["name"] for e in self.alice.connection.events(
            "peer_joined")], ["bob"])


class DeadStore:
    """
    The store of a node that is dead: nothing it queued is ever written.
    """

    def write_batch(self, batch):
        from twisted.internet import defer
        return defer.Deferred()
