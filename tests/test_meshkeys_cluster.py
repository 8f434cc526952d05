# -*- test-case-name: tests.test_meshkeys_cluster -*-
"""
Mesh key epochs on a cluster (issues 17 and 15): each node keeps the current
epoch of the meshes it serves, so a rotation committed through one node must
reach the others — their sessions hear C{mesh_key_rotated}, and their
broadcasts sealed under the old epoch are refused — by a notice, and, when
the notice was lost, by reading the store again (a rescan, or a send naming
an epoch the node does not know yet). Copies shared and members asking for
one cross nodes the same way.

Two in-process nodes on one inline SQLite store, one L{task.Clock} and one
L{LocalHub} (L{tests.test_cluster.ClusterFixture}).
"""

from twisted.trial.unittest import SynchronousTestCase

from claudemesh import crypto
from claudemesh.protocol import Refusal
from tests.test_cluster import ClusterFixture
from tests.test_meshkeys import LINK_KEY


class RotationAcrossNodesTests(SynchronousTestCase):
    def setUp(self):
        self.fx = ClusterFixture(2)
        node0 = self.fx.nodes[0]
        self.owner = node0.create_mesh()
        self.alice = node0.add_member(self.owner, "alice")
        self.bob = node0.add_member(self.owner, "bob")
        self.mesh_id = self.owner.mesh.id
        self.owner.connect()
        # alice and bob are served by the other node.
        self.alice1 = self.fx.peer_on(1, self.alice)
        self.bob1 = self.fx.peer_on(1, self.bob)
        self.alice1.connect()
        self.bob1.connect()
        self.addCleanup(lambda: [n.broker.stopService() for n in self.fx.nodes])

    def rotate(self, epoch, members=None):
        key = crypto.new_mesh_key()
        members = members or [self.owner, self.alice, self.bob]
        reply = self.owner.request({"type": "rotate_mesh_key", "epoch": epoch, "sealedKeys": [
            {"memberPubkey": p.pubkey, "sealedKey": crypto.seal_mesh_key(
                self.owner.identity, p.pubkey, self.mesh_id, epoch, key)} for p in members]})
        self.assertTrue(reply["committed"], reply)
        self.fx.flush()
        return key

    def broadcast(self, peer, key, epoch):
        nonce, ciphertext = crypto.encrypt_broadcast(key, b"hello all")
        return peer.request({"type": "send", "targetSpec": "*", "nonce": nonce,
                             "ciphertext": ciphertext, "keyEpoch": epoch})

    def test_rotation_reaches_the_other_node(self):
        """Sessions on the other node hear the rotation; their old-epoch broadcast is stale."""
        key = self.rotate(1)
        [event] = self.alice1.connection.events("mesh_key_rotated")
        self.assertEqual(event["eventData"], {"epoch": 1, "by": "owner",
                                              "byPubkey": self.owner.pubkey})
        ack = self.broadcast(self.alice1, LINK_KEY, 0)
        self.assertEqual((ack["queued"], ack["currentEpoch"]), (False, 1))
        self.assertTrue(ack["error"].startswith("stale_key_epoch"), ack)
        self.assertTrue(self.broadcast(self.alice1, key, 1)["queued"])
        self.assertEqual(self.fx.peer_on(1, self.bob).connect(session_id="b2")["keyEpoch"], 1)

    def test_lost_notice_caught_up_by_a_rescan(self):
        """With the notice lost, a rescan reads the epoch again and refuses the stale one."""
        self.fx.hub.dropping = True
        self.rotate(1)
        self.assertEqual(self.alice1.connection.events("mesh_key_rotated"), [])
        self.fx.hub.dropping = False
        self.fx.nodes[1].broker.cluster.rescan()
        self.fx.flush()
        self.assertEqual([e["eventData"]["epoch"] for e in
                          self.alice1.connection.events("mesh_key_rotated")], [1])
        ack = self.broadcast(self.alice1, LINK_KEY, 0)
        self.assertTrue(ack["error"].startswith("stale_key_epoch"), ack)

    def test_lost_notice_caught_up_by_a_newer_send(self):
        """A send naming an epoch the node does not know makes it read the store; retry passes."""
        self.fx.hub.dropping = True
        key = self.rotate(1)
        ack = self.broadcast(self.alice1, key, 1)
        self.assertTrue(ack["error"].startswith("unknown_key_epoch"), ack)
        self.fx.flush()
        self.assertTrue(self.broadcast(self.alice1, key, 1)["queued"])
        self.assertEqual(len(self.bob1.connection.events("mesh_key_rotated")), 1)
        self.assertTrue(self.broadcast(self.bob1, LINK_KEY, 0)["error"].startswith(
            "stale_key_epoch"))

    def test_old_or_repeated_notice_changes_nothing(self):
        """A notice of an epoch the node already passed does not move it back or announce."""
        self.rotate(1)
        self.rotate(2)
        events = len(self.alice1.connection.events("mesh_key_rotated"))
        self.fx.nodes[0].broker.cluster.notice("key_rotated", self.mesh_id, epoch=1)
        self.fx.nodes[0].broker.writes.flushed()
        self.fx.flush()
        self.assertEqual(len(self.alice1.connection.events("mesh_key_rotated")), events)
        self.assertEqual(self.broadcast(self.alice1, LINK_KEY, 1)["currentEpoch"], 2)

    def test_hello_never_hands_out_an_older_epoch(self):
        """With the notice lost, a hello on the other node reads the store: epoch 1."""
        self.fx.hub.dropping = True
        key = self.rotate(1)
        self.assertEqual(self.fx.peer_on(1, self.bob).connect(session_id="b2")["keyEpoch"], 1)
        # The node moved on: its other sessions hear it, old epochs are stale there.
        self.assertEqual(len(self.alice1.connection.events("mesh_key_rotated")), 1)
        self.assertTrue(self.broadcast(self.alice1, LINK_KEY, 0)["error"].startswith(
            "stale_key_epoch"))
        self.assertTrue(self.broadcast(self.alice1, key, 1)["queued"])


class CopiesAcrossNodesTests(SynchronousTestCase):
    def test_late_joiner_on_another_node(self):
        """A keyless member on node 1 asks; the owner on node 0 is told, shares, it is told."""
        fx = ClusterFixture(2)
        self.addCleanup(lambda: [n.broker.stopService() for n in fx.nodes])
        owner = fx.nodes[0].create_mesh()
        owner.connect()
        key = crypto.new_mesh_key()
        reply = owner.request({"type": "rotate_mesh_key", "epoch": 1, "sealedKeys": [
            {"memberPubkey": owner.pubkey, "sealedKey": crypto.seal_mesh_key(
                owner.identity, owner.pubkey, owner.mesh.id, 1, key)}]})
        self.assertTrue(reply["committed"])
        carol = fx.peer_on(1, fx.nodes[0].add_member(owner, "carol"))
        self.assertEqual(carol.connect()["keyEpoch"], 1)
        refusal = carol.request({"type": "get_mesh_key", "epoch": 1})
        self.assertIsInstance(refusal, Refusal)
        fx.flush()
        [wanted] = owner.connection.events("mesh_key_wanted")
        self.assertEqual(wanted["eventData"]["memberPubkey"], carol.pubkey)
        owner.request({"type": "share_mesh_key", "epoch": 1, "sealedKeys": [
            {"memberPubkey": carol.pubkey, "sealedKey": crypto.seal_mesh_key(
                owner.identity, carol.pubkey, owner.mesh.id, 1, key)}]})
        fx.flush()
        [shared] = carol.connection.events("mesh_key_shared")
        self.assertEqual(shared["eventData"], {"epoch": 1})
        copy = carol.request({"type": "get_mesh_key", "epoch": 1})
        self.assertEqual(crypto.open_mesh_key(carol.identity, copy["sealedBy"], owner.mesh.id,
                                              1, copy["sealedKey"]), key)

