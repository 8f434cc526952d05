"""
Unit tests of L{claudemesh.broker.cluster} (issue 15): nodes of one cluster
in one process, on one inline SQLite store, one L{task.Clock} and one
L{LocalHub} (the in-memory backplane), so no global reactor and no
Postgres: node start-up, heartbeat, a dead node's sessions reaped, and
notices between nodes.
"""

from twisted.trial.unittest import SynchronousTestCase

from claudemesh.broker import cluster
from claudemesh.broker.cluster import HEARTBEAT_SECONDS, NODE_TIMEOUT_SECONDS, LocalHub
from claudemesh.store.records import NodeRecord, SessionRecord
from tests.meshfixture import BrokerFixture, Peer, inline_store, result_of


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
        The same member identity, connecting through another node.
        """
        return Peer(self.nodes[node], peer.mesh, peer.member, peer.identity)


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
