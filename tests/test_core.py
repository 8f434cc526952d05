# -*- test-case-name: tests.test_core -*-
"""
Tests for L{claudemesh.broker.core}: hello, presence, status and delivery,
driven without sockets on an inline SQLite store and a fake clock.
"""

from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.protocol import Refusal
from tests.meshfixture import BrokerFixture


class MeshTestCase(unittest.TestCase):
    """
    A mesh with an owner, alice and bob, all connected.
    """

    def setUp(self):
        self.fx = BrokerFixture()
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")

    def refusal(self, peer, **hello):
        try:
            peer.connect(**hello)
        except Refusal as e:
            return e
        self.fail("hello was accepted")

    def queued(self):
        results = []
        self.fx.store.count_queued().addCallback(results.append)
        self.fx.flush()
        return results[0]


class HelloTests(MeshTestCase):
    def test_ack_fields(self):
        """A valid hello is acknowledged with the session's identity and the status settings."""
        ack = self.alice.connect()
        self.assertEqual(ack["type"], "hello_ack")
        self.assertEqual(ack["memberId"], self.alice.member.id)
        self.assertEqual(ack["memberDisplayName"], "alice")
        self.assertEqual(ack["role"], "member")
        self.assertEqual(ack["serverTime"], self.fx.now_ms())
        self.assertEqual(ack["statusTtlSeconds"], 60)
        self.assertEqual(ack["hookFreshWindowSeconds"], 30)
        self.assertTrue(ack["presenceId"])

    def test_timestamp_skew(self):
        """A hello signed more than 60 s away from the broker's clock is refused with 1008."""
        for offset in (-61_000, 61_000):
            e = self.refusal(self.alice, timestamp=self.fx.now_ms() + offset)
            self.assertEqual((e.code, e.close), ("timestamp_skew", (1008, "timestamp_skew")))

    def test_malformed_pubkey(self):
        """A pubkey that is not 64 lowercase hex characters is malformed."""
        e = self.refusal(self.alice, pubkey="XYZ")
        self.assertEqual((e.code, e.close), ("malformed", (1008, "malformed")))

    def test_bad_signature(self):
        """A signature by another key is refused as bad_signature."""
        other = crypto.Identity.generate()
        now = self.fx.now_ms()
        sig = other.sign(crypto.hello_string(
            self.alice.mesh.id, self.alice.member.id, self.alice.pubkey, now))
        e = self.refusal(self.alice, signature=sig)
        self.assertEqual((e.code, e.close), ("bad_signature", (1008, "bad_signature")))

    def test_member_id_must_match(self):
        """A valid signature with someone else's memberId is unauthorized."""
        now = self.fx.now_ms()
        sig = self.alice.identity.sign(crypto.hello_string(
            self.alice.mesh.id, self.bob.member.id, self.alice.pubkey, now))
        e = self.refusal(self.alice, memberId=self.bob.member.id, signature=sig)
        self.assertEqual((e.code, e.close), ("unauthorized", (1008, "unauthorized")))

    def test_unknown_key(self):
        """A key that is not a member of the mesh is unauthorized."""
        stranger = self.fx.add_member(self.owner, "stranger")
        stranger.identity = crypto.Identity.generate()
        e = self.refusal(stranger)
        self.assertEqual(e.code, "unauthorized")

    def test_revoked(self):
        """A banned member gets error revoked with the exact message, then close 4002."""
        self.fx.store.ban_member(self.alice.member.id, self.fx.now_ms())
        self.fx.flush()
        e = self.refusal(self.alice)
        self.assertEqual(e.code, "revoked")
        self.assertEqual(
            e.message, 'You\'ve been removed from "team". Contact the mesh owner to rejoin.')
        self.assertEqual(e.close, (4002, "banned"))

    def test_bad_session_pubkey(self):
        """A sessionPubkey that is not lowercase hex is refused before anything else."""
        e = self.refusal(self.alice, sessionPubkey="ABC")
        self.assertEqual((e.code, e.close), ("bad_session_pubkey", (1008, "bad_session_pubkey")))

    def test_session_key_needs_proof(self):
        """A session key without a valid proof by the member key is refused."""
        key = crypto.Identity.generate().pubkey
        e = self.refusal(self.alice, sessionPubkey=key, sessionSignature="00" * 64)
        self.assertEqual(e.code, "bad_session_pubkey")

    def test_capacity(self):
        """Past max_connections_per_mesh live sessions, a hello is refused with capacity."""
        self.fx = BrokerFixture(max_connections_per_mesh=1)
        owner = self.fx.create_mesh()
        alice = self.fx.add_member(owner, "alice")
        owner.connect()
        e = self.refusal(alice)
        self.assertEqual((e.code, e.close), ("capacity", (1008, "capacity")))

    def test_replacement(self):
        """A second hello with the same session id closes the first with 1000 session_replaced."""
        self.alice.connect(session_id="same")
        first = self.alice.connection
        self.bob.connect()
        self.alice.connect(session_id="same")
        self.assertEqual(first.closed, (1000, "session_replaced"))
        self.assertEqual(self.bob.connection.events("peer_left"), [])
        self.assertEqual(len(self.bob.connection.events("peer_joined")), 0)

    def test_receive_false_is_invisible(self):
        """A receive:false session is not listed and causes no presence events."""
        self.bob.connect()
        self.alice.connect(session_id="cli-1", receive=False)
        self.assertEqual(self.bob.connection.events(), [])
        peers = self.bob.request({"type": "list_peers"})["peers"]
        self.assertEqual([p["displayName"] for p in peers], ["bob"])


class PresenceTests(MeshTestCase):
    def test_list_peers(self):
        """list_peers lists every receiving session, the caller included, with its fields."""
        self.alice.connect()
        self.bob.connect(session_key=True)
        peers = self.alice.request({"type": "list_peers", "_reqId": "r"})["peers"]
        self.assertEqual([p["displayName"] for p in peers], ["alice", "bob"])
        bob = peers[1]
        self.assertEqual(bob["pubkey"], self.bob.session_identity.pubkey)
        self.assertEqual(bob["memberPubkey"], self.bob.pubkey)
        self.assertEqual(bob["role"], "member")
        self.assertEqual(bob["status"], "idle")
        self.assertEqual(bob["sessionId"], "s1")

    def test_joined_event(self):
        """Other members are told peer_joined; nobody else is."""
        self.alice.connect()
        self.bob.connect()
        [event] = self.alice.connection.events("peer_joined")
        self.assertEqual(event["eventData"]["name"], "bob")
        self.assertEqual(self.bob.connection.events(), [])

    def test_grace_reattach_is_silent(self):
        """A reconnect within 90 s of a drop emits neither peer_left nor peer_joined."""
        self.alice.connect()
        self.bob.connect()
        self.alice.connection.clear()
        self.bob.drop()
        self.fx.advance(60)
        self.bob.connect()
        self.assertEqual(self.alice.connection.events(), [])

    def test_grace_expiry(self):
        """After 90 s without a reconnect, peer_left is sent."""
        self.alice.connect()
        self.bob.connect()
        self.bob.drop()
        self.fx.advance(89)
        self.assertEqual(self.alice.connection.events("peer_left"), [])
        self.fx.advance(2)
        self.assertEqual(len(self.alice.connection.events("peer_left")), 1)

    def test_clean_close(self):
        """A clean client close sends peer_left at once."""
        self.alice.connect()
        self.bob.connect()
        self.bob.leave()
        self.assertEqual(len(self.alice.connection.events("peer_left")), 1)


class DeliveryTests(MeshTestCase):
    def test_dm_both_ways(self):
        """A DM arrives byte-identical, with the sender's keys, and can be answered."""
        self.alice.connect()
        self.bob.connect()
        ack = self.alice.send(self.bob.pubkey, b"hi bob", client_id="c1")
        self.assertEqual((ack["id"], ack["queued"]), ("c1", True))
        [push] = self.bob.connection.messages()
        self.assertEqual(push["messageId"], ack["messageId"])
        self.assertEqual(push["senderPubkey"], self.alice.pubkey)
        self.assertEqual(push["senderMemberPubkey"], self.alice.pubkey)
        self.assertEqual(push["targetSpec"], self.bob.pubkey)
        self.assertEqual(crypto.decrypt_direct(
            self.bob.identity, push["senderPubkey"], push["nonce"], push["ciphertext"]),
            b"hi bob")
        self.bob.send(self.alice.pubkey, b"hi alice")
        [back] = self.alice.connection.messages()
        self.assertEqual(crypto.decrypt_direct(
            self.alice.identity, back["senderPubkey"], back["nonce"], back["ciphertext"]),
            b"hi alice")

    def test_offline_member_gets_it_on_connect(self):
        """A DM to an offline member waits in the store and is pushed when it connects."""
        self.alice.connect()
        ack = self.alice.send(self.bob.pubkey, b"later")
        self.assertTrue(ack["queued"])
        self.assertEqual(self.queued(), 1)
        self.bob.connect()
        [push] = self.bob.connection.messages()
        self.assertEqual(push["messageId"], ack["messageId"])

    def test_unknown_target(self):
        """A DM to a key that is no member or session is refused with unknown_target."""
        self.alice.connect()
        ack = self.alice.send(crypto.Identity.generate().pubkey)
        self.assertEqual((ack["queued"], ack["error"]), (False, "unknown_target"))
        self.assertEqual(self.queued(), 0)

    def test_broadcast(self):
        """A broadcast reaches every other live member, not the sender's member."""
        self.alice.connect()
        self.bob.connect()
        self.owner.connect()
        self.alice.send("*", b"all")
        self.assertEqual(len(self.bob.connection.messages()), 1)
        self.assertEqual(len(self.owner.connection.messages()), 1)
        self.assertEqual(self.alice.connection.messages(), [])

    def test_group(self):
        """@g reaches sessions in g or a group below it, and no one else."""
        self.alice.connect()
        self.bob.connect()
        self.owner.connect()
        self.bob.request({"type": "join_group", "name": "team/backend"})
        self.alice.send("@team")
        self.assertEqual(len(self.bob.connection.messages()), 1)
        self.assertEqual(self.owner.connection.messages(), [])

    def test_idempotent_send(self):
        """A retried send with the same id returns the same messageId and stores one message."""
        self.alice.connect()
        first = self.alice.send(self.bob.pubkey, client_id="same")
        second = self.alice.send(self.bob.pubkey, client_id="same")
        self.assertEqual(first["messageId"], second["messageId"])
        self.assertEqual(self.queued(), 1)

    def test_redelivery_after_drop(self):
        """A push not acknowledged before the connection dropped is pushed again on reconnect."""
        self.alice.connect()
        self.bob.connect()
        ack = self.alice.send(self.bob.pubkey)
        self.assertEqual(len(self.bob.connection.messages()), 1)
        self.bob.drop()
        self.bob.connect()
        [again] = self.bob.connection.messages()
        self.assertEqual(again["messageId"], ack["messageId"])

    def test_redelivery_after_lease(self):
        """An unacknowledged push is pushed again after the 30 s lease."""
        self.alice.connect()
        self.bob.connect()
        self.alice.send(self.bob.pubkey)
        self.fx.advance(36)
        self.assertEqual(len(self.bob.connection.messages()), 2)

    def test_acked_not_redelivered(self):
        """An acknowledged push is never pushed again."""
        self.alice.connect()
        self.bob.connect()
        self.alice.send(self.bob.pubkey)
        self.bob.ack_all()
        self.fx.advance(40)
        self.bob.drop()
        self.bob.connect()
        self.assertEqual(len(self.bob.connection.messages()), 0)
        self.assertEqual(self.queued(), 0)

    def test_client_ack_unknown(self):
        """client_ack of an unknown or repeated id is a silent no-op."""
        self.bob.connect()
        self.assertIsNone(self.bob.request({"type": "client_ack", "messageId": "nope"}))
        self.assertEqual(self.bob.connection.frames, [])

    def test_order(self):
        """Queued messages go out in send order, with increasing seq."""
        self.alice.connect()
        for i in range(5):
            self.alice.send(self.bob.pubkey, b"%d" % i)
        self.bob.connect()
        seqs = [p["seq"] for p in self.bob.connection.messages()]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(seqs), 5)

    def test_rate_limit(self):
        """Past the burst, sends are refused with the rate_limit error text."""
        self.alice.connect()
        acks = [self.alice.send(self.bob.pubkey) for _ in range(11)]
        self.assertTrue(all(a["queued"] for a in acks[:10]))
        self.assertEqual(acks[10]["queued"], False)
        self.assertTrue(acks[10]["error"].startswith("rate_limit: max 60 msg/min (burst 10)"))

    def test_message_status(self):
        """message_status reports each recipient queued, then delivered after client_ack."""
        self.alice.connect()
        ack = self.alice.send(self.bob.pubkey)
        reply = self.alice.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual(reply["recipients"], [
            {"name": "bob", "pubkey": self.bob.pubkey, "status": "queued"}])
        self.bob.connect()
        self.bob.ack_all()
        reply = self.alice.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual(reply["recipients"][0]["status"], "delivered")

    def test_message_status_unknown(self):
        """message_status for an unknown id is refused with not_found."""
        self.alice.connect()
        reply = self.alice.request({"type": "message_status", "messageId": "nope"})
        self.assertIsInstance(reply, Refusal)
        self.assertEqual(reply.code, "not_found")


class StatusTests(MeshTestCase):
    def test_next_held_while_working(self):
        """A next message waits while the recipient works and goes out when it turns idle."""
        self.alice.connect()
        self.bob.connect()
        self.bob.request({"type": "set_status", "status": "working"})
        self.alice.send(self.bob.pubkey, priority="next")
        self.assertEqual(self.bob.connection.messages(), [])
        self.bob.request({"type": "set_status", "status": "idle"})
        self.assertEqual(len(self.bob.connection.messages()), 1)

    def test_now_passes_working_and_dnd(self):
        """A now message reaches a working or dnd recipient at once."""
        self.alice.connect()
        self.bob.connect()
        for status in ("working", "dnd"):
            self.bob.request({"type": "set_status", "status": status})
            self.alice.send(self.bob.pubkey, priority="now")
        self.assertEqual(len(self.bob.connection.messages()), 2)

    def test_ttl_decay(self):
        """working decays to idle after the TTL and releases held messages."""
        self.alice.connect()
        self.bob.connect()
        self.bob.request({"type": "set_status", "status": "working"})
        self.alice.send(self.bob.pubkey, priority="low")
        self.fx.advance(55)
        self.assertEqual(self.bob.session.status.status, "working")
        self.fx.advance(10)
        self.assertEqual(self.bob.session.status.status, "idle")
        self.assertEqual(len(self.bob.connection.messages()), 1)
