# -*- test-case-name: tests.test_delivery -*-
"""
Tests for delivery through the broker core (docs/protocol.md, delivery): which
session a delivery is leased to, what happens when it goes away, refusals
and what they leave stored, audit rows, expiry and limits. The broker runs
on an inline SQLite store and a fake clock.
"""

import json

from twisted.trial import unittest

from claudemesh import crypto
from tests.meshfixture import (
    BrokerFixture,
    FailingEnqueueStore,
    HeldClaimsStore,
    audit_rows,
    result_of,
    store_snapshot,
)


class DeliveryTestCase(unittest.TestCase):
    settings = {}

    def setUp(self):
        self.fx = BrokerFixture(store=self.make_store(), **self.settings)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")

    def make_store(self):
        return None

    def connect_as(self, peer, session_id, **kwargs):
        """
        Connect another session of C{peer}; returns C{(session, connection)}.
        """
        peer.connect(session_id=session_id, **kwargs)
        return peer.session, peer.connection

    def use(self, peer, session, connection):
        peer.session, peer.connection = session, connection

    def queued(self):
        self.fx.flush()
        return result_of(self.fx.store.count_queued())


class SessionTargetTests(DeliveryTestCase):
    def test_session_key_dm_only_to_that_session(self):
        """A DM to a session key is pushed to that session only, not its siblings."""
        one, one_conn = self.connect_as(self.bob, "b1", session_key=True)
        one_key = self.bob.session_identity
        self.bob.session_identity = None
        two, two_conn = self.connect_as(self.bob, "b2", session_key=True)
        self.alice.connect()
        nonce, ciphertext = crypto.encrypt_direct(self.alice.identity, one_key.pubkey, b"yo")
        ack = self.alice.request({"type": "send", "targetSpec": one_key.pubkey,
                                  "nonce": nonce, "ciphertext": ciphertext})
        self.assertTrue(ack["queued"])
        [push] = one_conn.messages()
        self.assertEqual(push["targetSpec"], one_key.pubkey)
        self.assertEqual(crypto.decrypt_direct(one_key, push["senderPubkey"], push["nonce"],
                                               push["ciphertext"]), b"yo")
        self.assertEqual(two_conn.messages(), [])

    def test_session_key_dm_waits_for_that_session(self):
        """A DM to a session key while that session is away waits for it, not for a sibling."""
        one, one_conn = self.connect_as(self.bob, "b1", session_key=True)
        one_key = self.bob.session_identity
        self.use(self.bob, one, one_conn)
        self.bob.drop()
        self.bob.session_identity = None
        two, two_conn = self.connect_as(self.bob, "b2", session_key=True)
        self.alice.connect()
        self.alice.send(one_key.pubkey)
        self.assertEqual(two_conn.messages(), [])
        self.bob.session_identity = one_key
        self.bob.connect(session_id="b1", session_key=True)
        self.assertEqual(len(self.bob.connection.messages()), 1)

    def test_member_dm_to_one_of_two_sessions(self):
        """A member DM with two live sessions is pushed to exactly one: the most recently active."""
        one, one_conn = self.connect_as(self.bob, "b1")
        self.fx.advance(1)
        two, two_conn = self.connect_as(self.bob, "b2")
        self.fx.advance(1)
        # b1 becomes the most recently active.
        self.use(self.bob, one, one_conn)
        self.bob.request({"type": "set_summary", "summary": "here"})
        self.alice.connect()
        self.alice.send(self.bob.pubkey)
        self.assertEqual((len(one_conn.messages()), len(two_conn.messages())), (1, 0))

    def test_fresh_push_not_claimed_again(self):
        """A delivery pushed to one session is not pushed again by a sibling's or its own claim."""
        one, one_conn = self.connect_as(self.bob, "b1")
        self.fx.advance(1)
        two, two_conn = self.connect_as(self.bob, "b2")
        self.alice.connect()
        self.alice.send(self.bob.pubkey)
        self.assertEqual((len(one_conn.messages()), len(two_conn.messages())), (0, 1))
        # Both sessions claim what waits for them (joining a group does).
        for session, connection in ((one, one_conn), (two, two_conn)):
            self.use(self.bob, session, connection)
            self.bob.request({"type": "join_group", "name": "ops"})
        self.assertEqual((len(one_conn.messages()), len(two_conn.messages())), (0, 1))

    def test_fresh_push_lease_is_stored(self):
        """A delivery pushed at once is stored leased to the session it was pushed to."""
        self.bob.connect()
        self.alice.connect()
        ack = self.alice.send(self.bob.pubkey)
        [row] = result_of(self.fx.store.message_deliveries(ack["messageId"]))
        self.assertEqual((row.state, row.lease_session, row.attempts),
                         ("leased", self.bob.session.presence_id, 1))

    def test_member_dm_skips_session_that_may_not_receive(self):
        """A next DM goes to the sibling that may receive it when the most active one works."""
        one, one_conn = self.connect_as(self.bob, "b1")
        self.fx.advance(1)
        two, two_conn = self.connect_as(self.bob, "b2")
        self.fx.advance(1)
        self.use(self.bob, one, one_conn)
        self.bob.request({"type": "set_status", "status": "working"})
        self.alice.connect()
        self.alice.send(self.bob.pubkey, priority="next")
        self.assertEqual((len(one_conn.messages()), len(two_conn.messages())), (0, 1))

    def test_list_peers_counts_as_activity(self):
        """list_peers is an application frame: it makes its session the most recently active."""
        one, one_conn = self.connect_as(self.bob, "b1")
        self.fx.advance(1)
        two, two_conn = self.connect_as(self.bob, "b2")
        self.fx.advance(1)
        self.use(self.bob, one, one_conn)
        self.bob.request({"type": "list_peers"})
        self.assertEqual(one.last_active_at, self.fx.now_ms())
        self.alice.connect()
        self.alice.send(self.bob.pubkey)
        self.assertEqual((len(one_conn.messages()), len(two_conn.messages())), (1, 0))

    def test_dropped_lease_goes_to_sibling(self):
        """A delivery leased to a session that drops is pushed to the sibling session."""
        one, one_conn = self.connect_as(self.bob, "b1")
        self.fx.advance(1)
        two, two_conn = self.connect_as(self.bob, "b2")
        self.alice.connect()
        ack = self.alice.send(self.bob.pubkey)
        [first] = two_conn.messages()
        self.use(self.bob, two, two_conn)
        self.bob.drop()
        [again] = one_conn.messages()
        self.assertEqual(again["messageId"], first["messageId"])
        self.use(self.bob, one, one_conn)
        self.bob.ack_all()
        reply = self.alice.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual(reply["recipients"][0]["status"], "delivered")

    def test_leaving_lease_goes_to_sibling(self):
        """A delivery leased to a session that closes cleanly is pushed to the sibling."""
        one, one_conn = self.connect_as(self.bob, "b1")
        self.fx.advance(1)
        two, two_conn = self.connect_as(self.bob, "b2")
        self.alice.connect()
        self.alice.send(self.bob.pubkey)
        self.assertEqual(len(two_conn.messages()), 1)
        self.use(self.bob, two, two_conn)
        self.bob.leave()
        self.assertEqual(len(one_conn.messages()), 1)

    def test_replaced_connection_lease_goes_to_new_connection(self):
        """A push not acknowledged on a replaced connection is pushed on the new one at once."""
        self.bob.connect(session_id="same")
        old = self.bob.connection
        self.alice.connect()
        ack = self.alice.send(self.bob.pubkey)
        self.assertEqual(len(old.messages()), 1)
        self.bob.connect(session_id="same")
        self.assertEqual(old.closed, (1000, "session_replaced"))
        [again] = self.bob.connection.messages()
        self.assertEqual(again["messageId"], ack["messageId"])

    def test_release_is_stored_before_the_claim(self):
        """The release of a dropped session's leases is committed before the sibling claims."""
        one, one_conn = self.connect_as(self.bob, "b1")
        self.fx.advance(1)
        two, two_conn = self.connect_as(self.bob, "b2")
        self.alice.connect()
        self.alice.send(self.bob.pubkey)
        # The drop and the claim happen in one reactor turn, before any flush.
        self.fx.broker.presence.connection_lost(two, two_conn, clean=False)
        self.assertEqual(one_conn.messages(), [])
        self.fx.flush()
        self.assertEqual(len(one_conn.messages()), 1)

    def test_broadcast_to_member_in_grace(self):
        """A broadcast to a member whose only session is in grace is queued, pushed on reattach."""
        self.alice.connect()
        self.bob.connect(session_id="b1")
        self.bob.drop()
        ack = self.alice.send("*", b"everyone")
        self.assertTrue(ack["queued"])
        self.assertEqual(self.queued(), 1)
        self.fx.advance(30)
        self.bob.connect(session_id="b1")
        [push] = self.bob.connection.messages()
        self.assertEqual((push["messageId"], push["targetSpec"]), (ack["messageId"], "*"))

    def test_broadcast_skips_departed_member(self):
        """A broadcast after a member's grace ran out does not include that member."""
        self.alice.connect()
        self.bob.connect(session_id="b1")
        self.bob.drop()
        self.fx.advance(91)
        self.alice.send("*")
        self.assertEqual(self.queued(), 0)

    def test_group_lease_only_to_session_in_group(self):
        """An @group delivery is leased only to the member's session that is in the group."""
        inside, inside_conn = self.connect_as(self.bob, "b1", groups=["ops"])
        self.fx.advance(1)
        outside, outside_conn = self.connect_as(self.bob, "b2")
        self.alice.connect()
        self.alice.send("@ops")
        self.assertEqual((len(inside_conn.messages()), len(outside_conn.messages())), (1, 0))
        # after the lease, it is pushed again to the same session, still not the other
        self.fx.advance(36)
        self.assertEqual((len(inside_conn.messages()), len(outside_conn.messages())), (2, 0))

    def test_group_delivery_waits_for_session_in_group(self):
        """A queued @group delivery is claimed when a sibling session joins the group."""
        inside, inside_conn = self.connect_as(self.bob, "b1", groups=["ops"])
        self.use(self.bob, inside, inside_conn)
        self.bob.drop()
        outside, outside_conn = self.connect_as(self.bob, "b2")
        self.alice.connect()
        self.alice.send("@ops")
        self.assertEqual(outside_conn.messages(), [])
        self.use(self.bob, outside, outside_conn)
        self.bob.request({"type": "join_group", "name": "ops/oncall"})
        self.assertEqual(len(outside_conn.messages()), 1)


class ClaimRaceTests(DeliveryTestCase):
    def make_store(self):
        self.wrapper = HeldClaimsStore()
        return self.wrapper

    def test_send_while_recipient_claims(self):
        """A DM sent while the recipient's claim runs is pushed once the message is committed."""
        from claudemesh import protocol

        self.alice.connect()
        self.wrapper.hold = True
        self.bob.connect()
        nonce, ciphertext = crypto.encrypt_direct(self.alice.identity, self.bob.pubkey, b"x")
        frame = protocol.decode(json.dumps({"type": "send", "targetSpec": self.bob.pubkey,
                                            "nonce": nonce, "ciphertext": ciphertext}))
        acks = []
        self.assertEqual(self.bob.session.outbox.state(), "claiming")
        self.fx.broker.delivery.send(self.alice.session, frame).addCallback(acks.append)
        # The running claim answers (it read the store before the message was
        # in it): nothing to push yet, and the message was not leased past it.
        held, self.wrapper.held = self.wrapper.held, []
        self.wrapper.hold = False
        for d, outcome in held:
            self.assertEqual(outcome.claimed, [[]])
            d.callback(outcome)
        self.fx.flush()
        # The claim after it, queued behind the message, found it: one push.
        [push] = self.bob.connection.messages()
        self.assertEqual(push["messageId"], acks[0]["messageId"])
        self.assertEqual(self.bob.session.outbox.state(), "idle")


class GroupCommitOrderTests(DeliveryTestCase):
    def test_claim_sees_a_release_queued_before_it(self):
        """A claim queued right after a lease release, in the same turn, takes those deliveries."""
        from claudemesh.store.records import ClaimRequest

        self.alice.connect()
        self.bob.connect()
        self.alice.send(self.bob.pubkey)
        [push] = self.bob.connection.messages()
        writes = self.fx.broker.writes
        writes.release_leases(self.bob.session.presence_id)
        claimed = []
        writes.claim(ClaimRequest(
            self.bob.member.id, None, "p-other", (), ("now", "next", "low"),
            self.fx.now_ms(), 30_000, 10)).addCallback(claimed.append)
        self.assertEqual(claimed, [])
        self.fx.flush()
        self.assertEqual([[row.message_id for row in rows] for rows in claimed],
                         [[push["messageId"]]])


class GroupCommitBatchCutTests(unittest.TestCase):
    def test_audit_travels_with_its_message(self):
        """A batch cut at max_batch messages leaves their audit events (and later ones) behind."""
        from twisted.internet import task

        from claudemesh.broker.groupcommit import GroupCommit
        from claudemesh.store.records import AuditEvent, MemberRecord, MeshRecord, NewMessage
        from tests.meshfixture import inline_store, result_of

        clock = task.Clock()
        batches = []
        store = inline_store()
        result_of(store.create_mesh(MeshRecord("mesh", "m", "m", "k", 1),
                                    MemberRecord("sender", "mesh", "k", "s", "owner", 1)))

        class Recording:
            def write_batch(self, batch):
                batches.append(batch)
                return store.write_batch(batch)

        writes = GroupCommit(Recording(), clock, max_batch=2)
        for n in range(3):
            message = NewMessage("m%d" % n, "mesh", "sender", "k", "k", "*", "next", "bg==",
                                 "eA==", 1, 2)
            writes.enqueue(message, AuditEvent("mesh", "message_sent", "sender", {"n": n}, 1))
        writes.audit(AuditEvent("mesh", "peer_left", "sender", {}, 1))
        clock.advance(0)
        [first, second] = batches
        self.assertEqual([m.id for m in first.messages], ["m0", "m1"])
        self.assertEqual([e.payload for e in first.audit], [{"n": 0}, {"n": 1}])
        self.assertEqual([m.id for m in second.messages], ["m2"])
        self.assertEqual([(e.event_type, e.payload) for e in second.audit],
                         [("message_sent", {"n": 2}), ("peer_left", {})])


class RefusalTests(DeliveryTestCase):
    settings = {"max_message_bytes": 300}

    def setUp(self):
        DeliveryTestCase.setUp(self)
        self.alice.connect()
        self.bob.connect()
        self.before = store_snapshot(self.fx.store)

    def assertNothingStored(self):
        self.fx.flush()
        self.assertEqual(store_snapshot(self.fx.store), self.before)
        self.assertEqual(self.bob.connection.messages(), [])

    def test_invalid_group_name(self):
        """@group with a name that is no valid group is unknown_target; nothing stored."""
        for target in ("@", "@bad name", "@a//b", "@" + "g" * 200):
            ack = self.alice.request({"type": "send", "targetSpec": target, "id": "g",
                                      "nonce": "bm9uY2U=", "ciphertext": "eA=="})
            self.assertEqual((ack["id"], ack["queued"], ack["error"]),
                             ("g", False, "unknown_target"), target)
        self.assertNothingStored()

    def test_too_large(self):
        """A payload over MAX_MESSAGE_BYTES is refused with the exact text; nothing stored."""
        nonce, ciphertext = "n" * 32, "c" * 300
        size = len(nonce) + len(ciphertext) + len(self.bob.pubkey)
        ack = self.alice.request({"type": "send", "targetSpec": self.bob.pubkey, "id": "big",
                                  "nonce": nonce, "ciphertext": ciphertext})
        self.assertEqual(ack, {
            "type": "ack", "id": "big", "messageId": "", "queued": False,
            "error": "payload too large: %d bytes > MAX_MESSAGE_BYTES=300" % (size,)})
        self.assertNothingStored()

    def test_unknown_direct_target(self):
        """A DM to a key nobody has is unknown_target; nothing stored."""
        ack = self.alice.send(crypto.Identity.generate().pubkey)
        self.assertEqual((ack["queued"], ack["error"]), (False, "unknown_target"))
        self.assertNothingStored()

    def test_revoked_target(self):
        """A DM to a revoked member's key is unknown_target."""
        import attr

        mesh = self.fx.broker.meshes.cached(self.bob.mesh.id)
        mesh.put_member(attr.evolve(self.bob.member, revoked_at=self.fx.now_ms()))
        ack = self.alice.send(self.bob.pubkey)
        self.assertEqual((ack["queued"], ack["error"]), (False, "unknown_target"))
        self.assertNothingStored()


class StoreFailureTests(DeliveryTestCase):
    def make_store(self):
        self.wrapper = FailingEnqueueStore()
        return self.wrapper

    def test_enqueue_failure(self):
        """When the store cannot enqueue, the ack is queued:false store_unavailable, no push."""
        self.alice.connect()
        self.bob.connect()
        self.wrapper.failing = True
        ack = self.alice.send(self.bob.pubkey, client_id="f1")
        self.assertEqual((ack["id"], ack["queued"], ack["messageId"]), ("f1", False, ""))
        self.assertTrue(ack["error"].startswith("store_unavailable"), ack["error"])
        self.assertEqual(self.bob.connection.messages(), [])
        self.assertEqual(self.queued(), 0)
        self.assertEqual([e.event_type for e in audit_rows(self.fx, self.alice.mesh.id)
                          if e.event_type == "message_sent"], [])
        # The broker keeps working once the store is back; the retry is stored once.
        self.wrapper.failing = False
        ack = self.alice.send(self.bob.pubkey, client_id="f1")
        self.assertTrue(ack["queued"])
        self.assertEqual(len(self.bob.connection.messages()), 1)
        self.flushErrors()

    def flushErrors(self):
        from claudemesh.store.interface import StoreUnavailable

        self.flushLoggedErrors(StoreUnavailable)


class AuditTests(DeliveryTestCase):
    def test_message_sent_metadata_only(self):
        """message_sent records {targetSpec, priority, bytes} and never the ciphertext or nonce."""
        self.alice.connect()
        nonce, ciphertext = crypto.encrypt_direct(self.alice.identity, self.bob.pubkey,
                                                  b"secret plans")
        self.alice.request({"type": "send", "targetSpec": self.bob.pubkey, "priority": "low",
                            "nonce": nonce, "ciphertext": ciphertext})
        rows = audit_rows(self.fx, self.alice.mesh.id)
        [sent] = [e for e in rows if e.event_type == "message_sent"]
        self.assertEqual(sent.payload, {"targetSpec": self.bob.pubkey, "priority": "low",
                                        "bytes": len(ciphertext)})
        self.assertEqual(sent.actor, self.alice.member.id)
        dumped = json.dumps([e.payload for e in rows])
        self.assertNotIn(ciphertext, dumped)
        self.assertNotIn(nonce, dumped)

    def test_presence_rows_and_chain(self):
        """peer_joined and peer_left are audited, and the chain verifies."""
        self.alice.connect()
        self.bob.connect()
        self.alice.send(self.bob.pubkey)
        self.bob.leave()
        rows = audit_rows(self.fx, self.alice.mesh.id)
        self.assertEqual([(e.event_type, e.actor) for e in rows], [
            ("peer_joined", self.alice.member.id),
            ("peer_joined", self.bob.member.id),
            ("message_sent", self.alice.member.id),
            ("peer_left", self.bob.member.id),
        ])
        self.assertEqual([e.seq for e in rows], sorted(e.seq for e in rows))
        result = result_of(self.fx.store.verify_chain(self.alice.mesh.id))
        self.assertTrue(result.valid)
        self.assertEqual(result.entries, 4)

    def test_grace_reattach_not_audited_twice(self):
        """A reattach within grace writes no second peer_joined and no peer_left."""
        self.bob.connect()
        self.bob.drop()
        self.fx.advance(10)
        self.bob.connect()
        rows = audit_rows(self.fx, self.bob.mesh.id)
        self.assertEqual([e.event_type for e in rows], ["peer_joined"])

    def test_receive_false_not_audited(self):
        """A receive:false session (a one-shot command) writes no presence rows."""
        self.bob.connect(session_id="cli-1", receive=False)
        self.bob.leave()
        self.assertEqual(audit_rows(self.fx, self.bob.mesh.id), [])


class ExpiryTests(DeliveryTestCase):
    settings = {"message_ttl_seconds": 60}

    def test_expired(self):
        """A delivery not confirmed within the TTL is expired and reported so; never pushed."""
        self.alice.connect()
        ack = self.alice.send(self.bob.pubkey)
        self.fx.advance(61)
        self.assertEqual(result_of(self.fx.store.expire_deliveries(self.fx.now_ms())), 1)
        reply = self.alice.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual(reply["recipients"], [
            {"name": "bob", "pubkey": self.bob.pubkey, "status": "expired"}])
        self.bob.connect()
        self.assertEqual(self.bob.connection.messages(), [])

    def test_not_claimed_after_ttl(self):
        """Even before the expiry job runs, a delivery past its TTL is not pushed."""
        self.alice.connect()
        self.alice.send(self.bob.pubkey)
        self.fx.advance(61)
        self.bob.connect()
        self.assertEqual(self.bob.connection.messages(), [])


class RateLimitTests(DeliveryTestCase):
    settings = {"send_rate_limit_per_min": 0, "send_rate_limit_burst": 0}

    def test_zero_disables(self):
        """A rate limit of 0 turns the send limit off."""
        self.alice.connect()
        acks = [self.alice.send(self.bob.pubkey) for _ in range(50)]
        self.assertTrue(all(a["queued"] for a in acks))
        self.assertEqual(self.queued(), 50)

    def test_zero_rate_with_burst_disables(self):
        """A per-minute rate of 0 alone also turns the limit off (the burst does not apply)."""
        from claudemesh.broker.core import Broker
        from claudemesh.broker.settings import BrokerSettings

        broker = Broker(self.fx.store, self.fx.clock,
                        BrokerSettings(send_rate_limit_per_min=0, send_rate_limit_burst=10))
        self.assertTrue(all(broker.delivery._send_buckets.take("m") for _ in range(50)))
