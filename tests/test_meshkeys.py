# -*- test-case-name: tests.test_meshkeys -*-
"""
Tests for L{claudemesh.broker.meshkeys} (issue 17): rotating a mesh's key,
driven through the broker core on an inline SQLite store with real keys —
the wire contract of docs/protocol.md ("Mesh key epochs"), its exact
refusals, and that a removed member's keys open nothing sealed after it.
"""

import json

import nacl.exceptions
import nacl.secret
from twisted.internet import defer
from twisted.trial import unittest

from claudemesh import crypto, protocol
from claudemesh.protocol import Refusal
from claudemesh.store.interface import StoreUnavailable
from tests.meshfixture import BrokerFixture, audit_rows, result_of, store_snapshot

# The key every member got with its invite link (epoch 0).
LINK_KEY = b"k" * 32


class RotationStoreFailure:
    """
    A store whose C{rotate_mesh_key} fails (the database went away between
    the upload and the commit) while C{failing} is set.
    """

    def __init__(self, store):
        self._store = store
        self.failing = False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def rotate_mesh_key(self, rotation, audit=()):
        if self.failing:
            return defer.fail(StoreUnavailable("the database is gone"))
        return self._store.rotate_mesh_key(rotation, audit)


class MeshKeysTestCase(unittest.TestCase):
    def setUp(self):
        from tests.meshfixture import inline_store

        self.store = RotationStoreFailure(inline_store())
        self.fx = BrokerFixture(store=self.store)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")
        for peer in (self.owner, self.alice, self.bob):
            peer.connect()
        self.mesh_id = self.owner.mesh.id

    def members(self):
        return [self.owner, self.alice, self.bob]

    def sealed(self, by, key, epoch, members):
        return [{"memberPubkey": peer.pubkey,
                 "sealedKey": crypto.seal_mesh_key(by.identity, peer.pubkey, self.mesh_id,
                                                   epoch, key)} for peer in members]

    def rotate(self, by=None, epoch=1, members=None, key=None, **extra):
        """
        C{rotate_mesh_key} as C{by}: returns C{(reply or Refusal, key)}.
        """
        by = by or self.owner
        key = key or crypto.new_mesh_key()
        members = self.members() if members is None else members
        frame = {"type": "rotate_mesh_key", "epoch": epoch,
                 "sealedKeys": self.sealed(by, key, epoch, members)}
        frame.update(extra)
        return by.request(frame), key

    def fetch(self, peer, epoch):
        """
        C{peer}'s own copy of C{epoch}'s key, opened as its client would.
        """
        reply = peer.request({"type": "get_mesh_key", "epoch": epoch})
        if isinstance(reply, Refusal):
            return reply
        return crypto.open_mesh_key(peer.identity, reply["sealedBy"], self.mesh_id, epoch,
                                    reply["sealedKey"])

    def broadcast(self, peer, key, epoch=None, target="*", text=b"hello all"):
        nonce, ciphertext = crypto.encrypt_broadcast(key, text)
        frame = {"type": "send", "targetSpec": target, "nonce": nonce, "ciphertext": ciphertext}
        if epoch is not None:
            frame["keyEpoch"] = epoch
        return peer.request(frame)

    def assertRefused(self, reply, code, **extra):
        self.assertIsInstance(reply, Refusal, reply)
        self.assertEqual(reply.code, code, reply.message)
        for name, value in extra.items():
            self.assertEqual(reply.extra.get(name), value, name)
        return reply


class RotationTests(MeshKeysTestCase):
    def test_rotation_reaches_every_member(self):
        """A committed rotation is acknowledged, announced, and each member opens its copy."""
        reply, key = self.rotate(reason="routine")
        self.assertEqual(reply, {"type": "rotate_mesh_key_ack", "epoch": 1, "committed": True,
                                 "members": 3})
        for peer in (self.alice, self.bob):
            [event] = peer.connection.events("mesh_key_rotated")
            self.assertEqual(event["eventData"], {"epoch": 1, "by": "owner",
                                                  "byPubkey": self.owner.pubkey})
            self.assertEqual(self.fetch(peer, 1), key)
        self.assertEqual(self.fetch(self.owner, 1), key)
        self.assertEqual(self.alice.connect(session_id="s2")["keyEpoch"], 1)

    def test_audit_entry_is_metadata(self):
        """The audit log records mesh_key_rotated {epoch, by, reason}, no key material."""
        reply, _ = self.rotate(reason="bob left")
        [entry] = [e for e in audit_rows(self.fx, self.mesh_id)
                   if e.event_type == "mesh_key_rotated"]
        self.assertEqual(entry.payload, {"epoch": 1, "by": "owner", "reason": "bob left"})
        self.assertEqual(entry.actor, self.owner.member.id)
        self.assertEqual(self.owner.request({"type": "audit_verify"})["valid"], True)

    def test_hello_ack_names_the_epoch(self):
        """hello_ack carries keyEpoch, 0 before any rotation."""
        self.assertEqual(self.alice.connect(session_id="s2")["keyEpoch"], 0)
        self.rotate()
        self.rotate(epoch=2)
        self.assertEqual(self.bob.connect(session_id="s3")["keyEpoch"], 2)

    def test_admin_rotates(self):
        """An admin may rotate the key."""
        carol = self.fx.add_member(self.owner, "carol", role="admin")
        carol.connect()
        reply, _ = self.rotate(by=carol, members=self.members() + [carol])
        self.assertTrue(reply["committed"])

    def test_parts_commit_together(self):
        """A rotation in parts commits with its last part, not before."""
        key = crypto.new_mesh_key()
        first = self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "more": True,
                                    "sealedKeys": self.sealed(self.owner, key, 1,
                                                              [self.owner, self.alice])})
        self.assertEqual(first, {"type": "rotate_mesh_key_ack", "epoch": 1,
                                 "committed": False, "staged": 2})
        self.assertEqual(self.alice.connection.events("mesh_key_rotated"), [])
        self.assertEqual(result_of(self.fx.store.current_key_epoch(self.mesh_id)), 0)
        last = self.owner.request({"type": "rotate_mesh_key", "epoch": 1,
                                   "sealedKeys": self.sealed(self.owner, key, 1, [self.bob])})
        self.assertEqual(last["members"], 3)
        self.assertEqual(self.fetch(self.bob, 1), key)


class StaleEpochTests(MeshKeysTestCase):
    def test_old_epoch_broadcast_refused(self):
        """After a rotation a broadcast sealed under epoch 0 is ack queued:false stale_key_epoch."""
        _, key = self.rotate()
        before = store_snapshot(self.fx.store)
        ack = self.broadcast(self.alice, LINK_KEY)
        self.assertEqual(ack["queued"], False)
        self.assertEqual(ack["currentEpoch"], 1)
        self.assertTrue(ack["error"].startswith("stale_key_epoch: sealed under key epoch 0"),
                        ack["error"])
        ack = self.broadcast(self.alice, LINK_KEY, epoch=0, target="@team")
        self.assertTrue(ack["error"].startswith("stale_key_epoch"))
        self.fx.flush()
        self.assertEqual(store_snapshot(self.fx.store), before)
        self.assertEqual(self.bob.connection.messages(), [])
        self.assertEqual(
            self.fx.metrics.messages_rejected.labels("stale_key_epoch")._value.get(), 2)

    def test_current_epoch_broadcast_pushed_with_its_epoch(self):
        """A broadcast under the current epoch is queued and pushed with keyEpoch."""
        _, key = self.rotate()
        ack = self.broadcast(self.alice, key, epoch=1)
        self.assertTrue(ack["queued"], ack)
        [push] = self.bob.connection.messages()
        self.assertEqual(push["keyEpoch"], 1)
        self.assertEqual(crypto.decrypt_broadcast(key, push["nonce"], push["ciphertext"]),
                         b"hello all")

    def test_future_epoch_refused(self):
        """A broadcast claiming an epoch that does not exist is unknown_key_epoch."""
        ack = self.broadcast(self.alice, LINK_KEY, epoch=5)
        self.assertEqual((ack["queued"], ack["currentEpoch"]), (False, 0))
        self.assertTrue(ack["error"].startswith("unknown_key_epoch"), ack["error"])

    def test_direct_messages_unaffected(self):
        """A DM is not sealed with the mesh key: its keyEpoch is ignored, no push carries one."""
        self.rotate()
        nonce, ciphertext = crypto.encrypt_direct(self.alice.identity, self.bob.pubkey, b"psst")
        ack = self.alice.request({"type": "send", "targetSpec": self.bob.pubkey,
                                  "nonce": nonce, "ciphertext": ciphertext, "keyEpoch": 0})
        self.assertTrue(ack["queued"], ack)
        [push] = self.bob.connection.messages()
        self.assertNotIn("keyEpoch", push)

    def test_before_any_rotation_old_clients_work(self):
        """On a mesh never rotated, a send without keyEpoch is epoch 0 and pushed as such."""
        ack = self.broadcast(self.alice, LINK_KEY)
        self.assertTrue(ack["queued"])
        self.assertEqual(self.bob.connection.messages()[0]["keyEpoch"], 0)


class RemovedMemberTests(MeshKeysTestCase):
    def test_banned_member_cannot_open_later_broadcasts(self):
        """A banned member holding every key it had cannot open what is broadcast after."""
        self.rotate()
        bob_keys = [LINK_KEY, self.fetch(self.bob, 1)]
        self.owner.request({"type": "ban", "target": "bob"})
        reply, key = self.rotate(epoch=2, members=[self.owner, self.alice])
        self.assertTrue(reply["committed"])
        self.broadcast(self.alice, key, epoch=2, text=b"after the ban")
        [push] = self.owner.connection.messages()
        self.assertEqual(crypto.decrypt_broadcast(
            self.fetch(self.owner, 2), push["nonce"], push["ciphertext"]), b"after the ban")
        # What a copy of the database, or another member's log, would hand bob.
        stored = result_of(self.fx.store.get_message(push["messageId"]))
        nonce, ciphertext = crypto._unb64(stored.nonce), crypto._unb64(stored.ciphertext)
        for held in bob_keys:
            self.assertRaises(nacl.exceptions.CryptoError,
                              nacl.secret.SecretBox(held).decrypt, ciphertext, nonce)
        # Nor can he get a copy of the new key: he cannot say hello.
        self.assertRaises(Refusal, self.bob.connect, session_id="again")

    def test_offline_member_reads_after_reconnecting(self):
        """A member offline during the rotation learns the epoch at hello and opens what waited."""
        # The network drops bob: his session waits in grace, unreachable.
        self.bob.drop()
        _, key = self.rotate()
        self.assertEqual(self.bob.connection.events("mesh_key_rotated"), [])
        self.assertTrue(self.broadcast(self.alice, key, epoch=1, text=b"while away")["queued"])
        ack = self.bob.connect()
        self.assertEqual((ack["keyEpoch"], ack.get("restored")), (1, True))
        [push] = self.bob.connection.messages()
        self.assertEqual(push["keyEpoch"], 1)
        self.assertEqual(crypto.decrypt_broadcast(self.fetch(self.bob, 1), push["nonce"],
                                                  push["ciphertext"]), b"while away")


class RefusalTests(MeshKeysTestCase):
    def assertNothingStored(self, before):
        self.fx.flush()
        self.assertEqual(store_snapshot(self.fx.store), before)

    def test_member_cannot_rotate(self):
        """A plain member's rotation is forbidden; nothing stored."""
        before = store_snapshot(self.fx.store)
        reply, _ = self.rotate(by=self.alice)
        self.assertRefused(reply, "forbidden")
        self.assertEqual(reply.message, "only owner or admin can rotate the mesh key")
        self.assertNothingStored(before)

    def test_copies_for_non_members(self):
        """A copy for a banned key or a stranger's is sealed_keys_mismatch naming it."""
        self.owner.request({"type": "ban", "target": "bob"})
        self.fx.flush()
        before = store_snapshot(self.fx.store)
        reply, _ = self.rotate()
        self.assertRefused(reply, "sealed_keys_mismatch", notMembers=[self.bob.pubkey])
        self.assertEqual(reply.message, "1 sealed copy is for a key that is not a member of"
                         " this mesh (banned, left, or never joined)")
        stranger = crypto.Identity.generate()
        frame = {"type": "rotate_mesh_key", "epoch": 1, "sealedKeys": self.sealed(
            self.owner, crypto.new_mesh_key(), 1, [self.owner, self.alice]) + [
            {"memberPubkey": stranger.pubkey, "sealedKey": "QUJD" * 30}]}
        self.assertRefused(self.owner.request(frame), "sealed_keys_mismatch",
                           notMembers=[stranger.pubkey])
        self.assertNothingStored(before)

    def test_missing_members(self):
        """Copies leaving a member out are sealed_keys_mismatch naming who is missing."""
        before = store_snapshot(self.fx.store)
        reply, _ = self.rotate(members=[self.owner, self.alice])
        self.assertRefused(reply, "sealed_keys_mismatch", missing=[self.bob.pubkey],
                           currentEpoch=0)
        self.assertEqual(reply.message, "1 current member has no sealed copy")
        self.assertNothingStored(before)

    def test_duplicate_and_skipped_epochs(self):
        """Epoch 2 before 1, and epoch 1 twice, are key_epoch_conflict with the current epoch."""
        reply, _ = self.rotate(epoch=2)
        self.assertRefused(reply, "key_epoch_conflict", currentEpoch=0)
        self.rotate()
        before = store_snapshot(self.fx.store)
        reply, _ = self.rotate(by=self.owner, epoch=1)
        self.assertRefused(reply, "key_epoch_conflict", currentEpoch=1)
        self.assertIn("the next key epoch is 2, not 1", reply.message)
        self.assertNothingStored(before)

    def test_member_twice(self):
        """The same member twice, in one part or across parts, is malformed naming sealedKeys."""
        key = crypto.new_mesh_key()
        twice = self.sealed(self.owner, key, 1, [self.owner, self.alice, self.alice])
        with self.assertRaises(protocol.Refusal) as caught:
            self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "sealedKeys": twice})
        self.assertEqual(caught.exception.code, "malformed")
        self.assertIn("'sealedKeys'", caught.exception.message)
        self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "more": True,
                            "sealedKeys": self.sealed(self.owner, key, 1, [self.alice])})
        reply = self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "sealedKeys":
                                    self.sealed(self.owner, key, 1, self.members())})
        self.assertRefused(reply, "malformed")
        self.assertIn("'sealedKeys'", reply.message)

    def test_bad_frames(self):
        """Oversized, non-base64 or NUL blobs, huge or negative epochs are malformed."""
        good = {"memberPubkey": self.alice.pubkey, "sealedKey": "QUJD" * 30}
        bad = [
            {"epoch": 1, "sealedKeys": [dict(good, sealedKey="QUJD" * 200)]},
            {"epoch": 1, "sealedKeys": [dict(good, sealedKey="not base64!")]},
            {"epoch": 1, "sealedKeys": [dict(good, sealedKey="QUJD" * 29 + "QU\x00D")]},
            {"epoch": 1, "sealedKeys": [dict(good, sealedKey="QUJD")]},
            {"epoch": 1, "sealedKeys": [dict(good, memberPubkey="A" * 64)]},
            {"epoch": 1, "sealedKeys": [dict(good, memberPubkey="a" * 63 + "\x00")]},
            {"epoch": 1, "sealedKeys": [good], "reason": "x\x00y"},
            {"epoch": 1, "sealedKeys": [good], "reason": "r" * 201},
            {"epoch": 1, "sealedKeys": {"a": 1}},
            {"epoch": 1, "sealedKeys": ["QUJD"]},
            {"epoch": 2**53, "sealedKeys": [good]},
            {"epoch": 0, "sealedKeys": [good]},
            {"epoch": -1, "sealedKeys": [good]},
            {"epoch": True, "sealedKeys": [good]},
            {"epoch": "1", "sealedKeys": [good]},
        ]
        for fields in bad:
            frame = dict(fields, type="rotate_mesh_key")
            with self.assertRaises(protocol.Refusal, msg=fields) as caught:
                protocol.decode(json.dumps(frame))
            self.assertEqual(caught.exception.code, "malformed", fields)
        for frame in ({"type": "send", "targetSpec": "*", "nonce": "n", "ciphertext": "c",
                       "keyEpoch": 2**60},
                      {"type": "get_mesh_key", "epoch": -3}):
            with self.assertRaises(protocol.Refusal):
                protocol.decode(json.dumps(frame))

    def test_huge_but_safe_epoch(self):
        """An epoch far past the next one is key_epoch_conflict, never stored."""
        reply, _ = self.rotate(epoch=2**53 - 1)
        self.assertRefused(reply, "key_epoch_conflict", currentEpoch=0)
        self.assertEqual(self.fetch(self.alice, 2**53 - 1).code, "no_sealed_key")


class InterruptedRotationTests(MeshKeysTestCase):
    def test_client_gone_between_parts(self):
        """A client that dies after a first part leaves epoch 0 current and the mesh working."""
        key = crypto.new_mesh_key()
        self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "more": True,
                            "sealedKeys": self.sealed(self.owner, key, 1, self.members()[:2])})
        self.owner.drop()
        ack = self.owner.connect(session_id="s1")
        self.assertEqual(ack["keyEpoch"], 0)
        # Its reconnected session finishing the rotation starts from nothing.
        reply = self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "sealedKeys":
                                    self.sealed(self.owner, key, 1, [self.bob])})
        self.assertRefused(reply, "sealed_keys_mismatch", currentEpoch=0)
        self.assertEqual(sorted(reply.extra["missing"]),
                         sorted([self.owner.pubkey, self.alice.pubkey]))
        self.assertTrue(self.broadcast(self.alice, LINK_KEY)["queued"])
        self.assertEqual(self.fetch(self.bob, 1).code, "no_sealed_key")

    def test_store_fails_at_commit(self):
        """The store failing between upload and commit leaves epoch 0; a retry commits."""
        self.store.failing = True
        reply, _ = self.rotate()
        self.assertIsInstance(reply, StoreUnavailable)
        self.assertEqual(self.alice.connection.events("mesh_key_rotated"), [])
        self.assertTrue(self.broadcast(self.alice, LINK_KEY)["queued"])
        self.assertEqual(len(self.bob.connection.messages()), 1)
        self.store.failing = False
        reply, _ = self.rotate()
        self.assertTrue(reply["committed"])

    def test_staging_expires(self):
        """Parts left unfinished for over five minutes are dropped."""
        key = crypto.new_mesh_key()
        self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "more": True,
                            "sealedKeys": self.sealed(self.owner, key, 1, [self.owner])})
        self.fx.advance(299)
        self.owner.request({"type": "rotate_mesh_key", "epoch": 1, "more": True,
                            "sealedKeys": self.sealed(self.owner, key, 1, [self.alice])})
        self.fx.advance(2)
        reply, _ = self.rotate(by=self.owner, members=[self.bob])
        self.assertRefused(reply, "sealed_keys_mismatch")
        self.assertEqual(sorted(reply.extra["missing"]),
                         sorted([self.owner.pubkey, self.alice.pubkey]))


class MembersWithoutCopyTests(MeshKeysTestCase):
    def test_late_joiner_asks_and_gets_shared(self):
        """A member without a copy asks; moderators are told once; a share reaches it."""
        _, key = self.rotate()
        carol = self.fx.add_member(self.owner, "carol")
        self.assertEqual(carol.connect()["keyEpoch"], 1)
        refusal = self.fetch(carol, 1)
        self.assertRefused(refusal, "no_sealed_key", epoch=1, currentEpoch=1)
        [wanted] = self.owner.connection.events("mesh_key_wanted")
        self.assertEqual(wanted["eventData"], {"epoch": 1, "name": "carol",
                                               "memberPubkey": carol.pubkey})
        self.assertEqual(self.alice.connection.events("mesh_key_wanted"), [])
        self.fetch(carol, 1)
        self.assertEqual(len(self.owner.connection.events("mesh_key_wanted")), 1)
        ack = self.owner.request({"type": "share_mesh_key", "epoch": 1,
                                  "sealedKeys": self.sealed(self.owner, key, 1, [carol])})
        self.assertEqual(ack, {"type": "share_mesh_key_ack", "epoch": 1, "shared": 1})
        [shared] = carol.connection.events("mesh_key_shared")
        self.assertEqual(shared["eventData"], {"epoch": 1})
        self.assertEqual(self.fetch(carol, 1), key)

    def test_share_refusals(self):
        """Members may not share; epoch 0 and old epochs are key_epoch_conflict."""
        carol = self.fx.add_member(self.owner, "carol")
        sealed = self.sealed(self.owner, LINK_KEY, 0, [carol])
        self.assertRefused(self.alice.request(
            {"type": "share_mesh_key", "epoch": 1, "sealedKeys": sealed}), "forbidden")
        self.assertRefused(self.owner.request(
            {"type": "share_mesh_key", "epoch": 1, "sealedKeys": sealed}),
            "key_epoch_conflict", currentEpoch=0)

    def test_epoch_zero_has_no_copy(self):
        """get_mesh_key for epoch 0 is no_sealed_key: that key is the invite link's."""
        refusal = self.assertRefused(self.fetch(self.alice, 0), "no_sealed_key", epoch=0)
        self.assertIn("invite link", refusal.message)

    def test_moderators_told_at_hello(self):
        """An owner's hello_ack lists departures since the last rotation and keyless members."""
        ack = self.owner.connect(session_id="o2")
        self.assertEqual(ack["keyStatus"], {"departedSinceRotation": [], "departedTotal": 0,
                                            "withoutKey": [], "unbannedSinceRotation": []})
        self.assertNotIn("keyStatus", self.alice.connect(session_id="a2"))
        self.owner.request({"type": "ban", "target": "bob"})
        self.alice.request({"type": "leave"})
        self.fx.flush()
        status = self.owner.connect(session_id="o3")["keyStatus"]
        self.assertEqual([(d["name"], d["pubkey"], d["event"]) for d in
                          status["departedSinceRotation"]],
                         [("bob", self.bob.pubkey, "banned"),
                          ("alice", self.alice.pubkey, "left")])
        self.assertEqual(status["departedTotal"], 2)
        self.rotate(members=[self.owner])
        carol = self.fx.add_member(self.owner, "carol")
        status = self.owner.connect(session_id="o4")["keyStatus"]
        self.assertEqual((status["departedSinceRotation"], status["withoutKey"]),
                         ([], [{"name": "carol", "memberPubkey": carol.pubkey}]))

    def test_epoch_of_a_ban_not_shared_after_the_unban(self):
        """
        bob banned, epoch 1 made without him, bob unbanned (review 2, N3):
        moderators are told he needs a rotation, not a share; his ask is
        refused saying why and wakes no moderator; a share for him is
        refused; the next rotation includes him.
        """
        self.owner.request({"type": "ban", "target": "bob"})
        self.fx.flush()
        self.fx.clock.advance(1)
        _, key = self.rotate(members=[self.owner, self.alice])
        self.fx.clock.advance(1)
        self.owner.request({"type": "unban", "target": "bob"})
        self.fx.flush()
        status = self.owner.connect(session_id="o2")["keyStatus"]
        self.assertEqual((status["withoutKey"], status["unbannedSinceRotation"]),
                         ([], [{"name": "bob", "memberPubkey": self.bob.pubkey}]))
        self.bob.connect(session_id="b2")
        refusal = self.assertRefused(self.fetch(self.bob, 1), "no_sealed_key", epoch=1,
                                     currentEpoch=1, bannedWhenMade=True)
        self.assertIn("key epoch 1 was made while this member was banned", refusal.message)
        self.assertEqual(self.owner.connection.events("mesh_key_wanted"), [])
        refusal = self.assertRefused(self.owner.request(
            {"type": "share_mesh_key", "epoch": 1,
             "sealedKeys": self.sealed(self.owner, key, 1, [self.bob])}),
            "sealed_keys_mismatch", shutOut=[self.bob.pubkey])
        self.assertEqual(refusal.message, "key epoch 1 was made while bob was banned: it is"
                                          " not shared with them; rotate the key instead")
        self.assertRefused(self.fetch(self.bob, 1), "no_sealed_key")
        _, fresh = self.rotate(epoch=2)
        self.assertEqual(self.fetch(self.bob, 2), fresh)
        status = self.owner.request({"type": "mesh_key_status"})["keyStatus"]
        self.assertEqual(status["unbannedSinceRotation"], [])

    def test_key_status_asked_again(self):
        """mesh_key_status says what hello_ack does, now: departures for moderators only."""
        self.assertEqual(self.owner.request({"type": "mesh_key_status"}), {
            "type": "mesh_key_status_result", "keyEpoch": 0, "keyStatus": {
                "departedSinceRotation": [], "departedTotal": 0, "withoutKey": [],
                "unbannedSinceRotation": []}})
        self.owner.request({"type": "ban", "target": "bob"})
        self.fx.flush()
        status = self.owner.request({"type": "mesh_key_status"})["keyStatus"]
        self.assertEqual([(d["name"], d["event"]) for d in status["departedSinceRotation"]],
                         [("bob", "banned")])
        self.assertEqual(self.alice.request({"type": "mesh_key_status"}),
                         {"type": "mesh_key_status_result", "keyEpoch": 0})
        self.rotate(members=[self.owner, self.alice])
        self.assertEqual(self.owner.request({"type": "mesh_key_status"})["keyStatus"][
            "departedSinceRotation"], [])
        self.assertEqual(self.alice.request({"type": "mesh_key_status"})["keyEpoch"], 1)
