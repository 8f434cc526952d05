# -*- test-case-name: tests.test_meshkeys_wire -*-
"""
An adversarial pass on the mesh key rotation protocol (issue 17): frames
from an owner's or admin's connection that are oversized, carry NUL bytes or
huge numbers, replay an earlier rotation, or race a ban, a join or another
rotation. Each gets a clear refusal; the broker keeps serving everyone else,
stores nothing of the refused rotation, and logs no traceback.

Over the WebSocket layer on memory wires (L{WireConnection}) and through the
broker core (L{tests.test_meshkeys.MeshKeysTestCase}), on a fake clock.
"""

import json

from twisted.internet import defer

from claudemesh import crypto
from claudemesh.broker import core
from tests.meshfixture import WireConnection, result_of, store_snapshot
from tests.test_limits import WireLimitTests
from tests.test_meshkeys import LINK_KEY, MeshKeysTestCase


class RotationOverTheWireTests(WireLimitTests):
    """
    Bad rotation frames from a real owner's WebSocket connection.
    """

    def setUp(self):
        WireLimitTests.setUp(self)
        self.mesh_id = self.owner.mesh.id
        self.owner_wire = self.hello(self.owner)
        self.alice_wire = self.hello(self.alice)

    def hello(self, peer, session_id="s1"):
        wire = WireConnection(self.fx, self.factory)
        wire.send(peer.hello_dict(session_id=session_id))
        self.assertEqual(wire.last()["type"], "hello_ack")
        return wire

    def copies(self, epoch=1, key=None, members=None):
        key = key or crypto.new_mesh_key()
        members = members or [self.owner, self.alice]
        return [{"memberPubkey": p.pubkey, "sealedKey": crypto.seal_mesh_key(
            self.owner.identity, p.pubkey, self.mesh_id, epoch, key)} for p in members]

    def request(self, wire, frame, raw=None):
        """
        Send C{frame} (or the text C{raw}) with a request id; its reply.
        """
        wire.send_raw((raw if raw is not None else json.dumps(
            dict(frame, _reqId="r1"))).encode("utf-8"))
        return wire.last()

    def assertServing(self):
        """
        The broker still serves: alice's broadcast is queued and the owner's
        rotation commits.
        """
        nonce, ciphertext = crypto.encrypt_broadcast(LINK_KEY, b"still here")
        epoch = result_of(self.fx.store.current_key_epoch(self.mesh_id))
        ack = self.request(self.alice_wire, {"type": "send", "targetSpec": "*", "nonce": nonce,
                                             "ciphertext": ciphertext, "keyEpoch": epoch,
                                             "id": "still-%d" % (epoch,)})
        self.assertEqual((ack["type"], ack["queued"]), ("ack", True), ack)
        reply = self.request(self.owner_wire, {"type": "rotate_mesh_key", "epoch": epoch + 1,
                                               "sealedKeys": self.copies(epoch + 1)})
        self.assertEqual((reply["type"], reply.get("committed")),
                         ("rotate_mesh_key_ack", True), reply)
        self.assertEqual(self.flushLoggedErrors(), [])

    def assertMalformed(self, reply, field):
        self.assertEqual((reply["type"], reply["code"]), ("error", "malformed"), reply)
        self.assertIn(field, reply["message"])

    def test_oversized_frame_closes_only_its_connection(self):
        """A rotation frame over the frame limit closes that connection 1009; others go on."""
        before = store_snapshot(self.fx.store)
        huge = {"type": "rotate_mesh_key", "epoch": 1,
                "sealedKeys": self.copies(), "reason": "r" * 200,
                "padding": "x" * (self.fx.settings.max_message_bytes + 10)}
        self.owner_wire.send_raw(json.dumps(huge).encode("utf-8"))
        self.assertEqual(self.owner_wire.client.close_info[1], 1009)
        self.fx.flush()
        self.assertEqual(store_snapshot(self.fx.store), before)
        self.owner_wire = self.hello(self.owner, session_id="s2")
        self.assertServing()

    def test_oversized_blob_refused(self):
        """A sealedKey over 256 bytes, or a reason over 200 characters, is malformed."""
        copies = self.copies()
        copies[1]["sealedKey"] = "QUJD" * 100
        self.assertMalformed(self.request(self.owner_wire, {
            "type": "rotate_mesh_key", "epoch": 1, "sealedKeys": copies}), "sealedKey")
        self.assertMalformed(self.request(self.owner_wire, {
            "type": "rotate_mesh_key", "epoch": 1, "sealedKeys": self.copies(),
            "reason": "r" * 201}), "reason")
        self.assertServing()

    def test_nul_bytes_refused(self):
        """NUL in a sealed key, a member key, a reason: malformed naming it, nothing stored."""
        before = store_snapshot(self.fx.store)
        for where, change in (
                ("sealedKey", lambda c: c[0].update(sealedKey=c[0]["sealedKey"][:-1] + "\x00")),
                ("memberPubkey", lambda c: c[0].update(
                    memberPubkey=c[0]["memberPubkey"][:-1] + "\x00")),
        ):
            copies = self.copies()
            change(copies)
            self.assertMalformed(self.request(self.owner_wire, {
                "type": "rotate_mesh_key", "epoch": 1, "sealedKeys": copies}), where)
        self.assertMalformed(self.request(self.owner_wire, {
            "type": "rotate_mesh_key", "epoch": 1, "sealedKeys": self.copies(),
            "reason": "ban\x00of bob"}), "reason")
        self.assertMalformed(self.request(self.owner_wire, {
            "type": "share_mesh_key", "epoch": 1, "sealedKeys": [
                {"memberPubkey": self.alice.pubkey, "sealedKey": "QUJD" * 29 + "QU\x00D"}]}),
            "sealedKey")
        self.fx.flush()
        self.assertEqual(store_snapshot(self.fx.store), before)
        self.assertServing()

    def test_huge_epochs_refused(self):
        """Epochs of 2^53, 10^4000, negative, fractional, text or true are malformed."""
        copies = json.dumps(self.copies())
        for epoch in ("9007199254740992", "1" + "0" * 4000, "-1", "1.5", '"1"', "true",
                      "1e400"):
            for frame in ('{"type": "rotate_mesh_key", "epoch": %s, "sealedKeys": %s,'
                          ' "_reqId": "r1"}' % (epoch, copies),
                          '{"type": "get_mesh_key", "epoch": %s, "_reqId": "r1"}' % (epoch,),
                          '{"type": "share_mesh_key", "epoch": %s, "sealedKeys": %s,'
                          ' "_reqId": "r1"}' % (epoch, copies)):
                reply = self.request(self.owner_wire, None, raw=frame)
                self.assertEqual((reply["type"], reply.get("code")), ("error", "malformed"),
                                 (epoch[:20], reply))
        nonce, ciphertext = crypto.encrypt_broadcast(LINK_KEY, b"x")
        reply = self.request(self.alice_wire, None, raw=(
            '{"type": "send", "targetSpec": "*", "nonce": "%s", "ciphertext": "%s",'
            ' "keyEpoch": 1%s, "_reqId": "r1"}' % (nonce, ciphertext, "0" * 4000)))
        self.assertEqual(reply.get("code"), "malformed", reply)
        self.assertEqual(result_of(self.fx.store.current_key_epoch(self.mesh_id)), 0)
        self.assertServing()

    def test_replayed_rotation_refused(self):
        """The same rotation frame sent again, or a part of it, changes nothing."""
        key = crypto.new_mesh_key()
        frame = {"type": "rotate_mesh_key", "epoch": 1, "sealedKeys": self.copies(key=key),
                 "reason": "routine"}
        self.assertTrue(self.request(self.owner_wire, frame)["committed"])
        stored = result_of(self.fx.store.get_mesh_key_copy(
            self.mesh_id, 1, self.alice.member.id))
        other = self.hello(self.owner, session_id="s2")
        self.fx.flush()
        before = store_snapshot(self.fx.store)
        for replay in (frame, dict(frame, more=True)):
            reply = self.request(self.owner_wire, replay)
            self.assertEqual((reply["code"], reply["currentEpoch"]), ("key_epoch_conflict", 1),
                             reply)
            self.assertIn("the next key epoch is 2, not 1", reply["message"])
        # From another session of the owner, too.
        self.assertEqual(self.request(other, frame)["code"], "key_epoch_conflict")
        self.fx.flush()
        self.assertEqual(store_snapshot(self.fx.store), before)
        self.assertEqual(result_of(self.fx.store.get_mesh_key_copy(
            self.mesh_id, 1, self.alice.member.id)), stored)
        self.assertServing()


class HeldRotationStore:
    """
    A store whose C{rotate_mesh_key} waits for L{release}, so that other
    requests run between a rotation's last part and its commit.
    """

    def __init__(self, store):
        self._store = store
        self.held = None

    def __getattr__(self, name):
        return getattr(self._store, name)

    def rotate_mesh_key(self, rotation, audit=()):
        self.held = defer.Deferred()
        self.held.addCallback(lambda _: self._store.rotate_mesh_key(rotation, audit))
        return self.held

    def release(self):
        held, self.held = self.held, None
        held.callback(None)


class RotationRaceTests(MeshKeysTestCase):
    """
    A rotation racing a ban, a join or another rotation.
    """

    def setUp(self):
        MeshKeysTestCase.setUp(self)
        self.carol = self.fx.add_member(self.owner, "carol", role="admin")
        self.carol.connect()

    def members(self):
        return [self.owner, self.alice, self.bob, self.carol]

    def part(self, by, key, members, epoch=1, more=True):
        return by.request({"type": "rotate_mesh_key", "epoch": epoch, "more": more,
                           "sealedKeys": self.sealed(by, key, epoch, members)})

    def hold_commits(self):
        held = HeldRotationStore(self.fx.store)
        self.fx.broker.mesh_keys._store = held
        return held

    def assertStillWorking(self, epoch, banned=()):
        """
        The mesh goes on at C{epoch}: a rotation to the next one commits and
        reaches every member in good standing (all but C{banned}).
        """
        members = [p for p in self.members() if p not in banned]
        reply, key = self.rotate(epoch=epoch + 1, members=members)
        self.assertTrue(reply["committed"], reply)
        self.assertEqual(self.fetch(self.alice, epoch + 1), key)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_ban_between_parts(self):
        """A member banned between two parts: the last is refused naming it, epoch 0 stays."""
        key = crypto.new_mesh_key()
        self.part(self.carol, key, [self.owner, self.bob])
        self.owner.request({"type": "ban", "target": "bob"})
        reply = self.part(self.carol, key, [self.alice, self.carol], more=False)
        self.assertRefused(reply, "sealed_keys_mismatch", notMembers=[self.bob.pubkey],
                           currentEpoch=0)
        self.assertEqual(result_of(self.fx.store.current_key_epoch(self.mesh_id)), 0)
        self.assertEqual(self.fetch(self.alice, 1).code, "no_sealed_key")
        self.assertStillWorking(0, banned=[self.bob])

    def test_ban_during_the_commit(self):
        """A ban landing after the last part, before the commit: the store refuses it all."""
        held = self.hold_commits()
        results = []
        key = crypto.new_mesh_key()
        d = defer.maybeDeferred(
            self.fx.broker.mesh_keys.rotate, self.owner.session,
            _decode({"type": "rotate_mesh_key", "epoch": 1,
                     "sealedKeys": self.sealed(self.owner, key, 1, self.members())}))
        d.addBoth(results.append)
        self.fx.flush()
        self.assertIsNotNone(held.held)
        self.assertEqual(self.owner.request({"type": "ban", "target": "bob"}),
                         {"type": "ban_ack", "banned": "bob"})
        held.release()
        self.fx.flush()
        [refusal] = [r.value for r in results]
        self.assertRefused(refusal, "sealed_keys_mismatch", notMembers=[self.bob.pubkey],
                           currentEpoch=0)
        self.fx.broker.mesh_keys._store = held._store
        self.assertStillWorking(0, banned=[self.bob])

    def test_ban_just_after_the_commit_is_reported(self):
        """A ban right after a rotation counts as a departure since it: owners are told."""
        reply, _ = self.rotate(members=self.members())
        self.assertTrue(reply["committed"])
        self.owner.request({"type": "ban", "target": "bob"})
        self.fx.flush()
        status = self.owner.request({"type": "mesh_key_status"})["keyStatus"]
        self.assertEqual([(d["name"], d["event"]) for d in status["departedSinceRotation"]],
                         [("bob", "banned")])

    def test_join_between_parts(self):
        """A member joining between two parts is missing at the last; a retry includes it."""
        key = crypto.new_mesh_key()
        self.part(self.owner, key, [self.owner, self.alice])
        dave = self.fx.add_member(self.owner, "dave")
        reply = self.part(self.owner, key, [self.bob, self.carol], more=False)
        self.assertRefused(reply, "sealed_keys_mismatch", missing=[dave.pubkey],
                           currentEpoch=0)
        reply, _ = self.rotate(members=self.members() + [dave])
        self.assertTrue(reply["committed"], reply)

    def test_join_during_the_commit(self):
        """A join landing before the commit is seen by the store: refused, naming who is missing."""
        held = self.hold_commits()
        results = []
        d = defer.maybeDeferred(
            self.fx.broker.mesh_keys.rotate, self.owner.session,
            _decode({"type": "rotate_mesh_key", "epoch": 1, "sealedKeys": self.sealed(
                self.owner, crypto.new_mesh_key(), 1, self.members())}))
        d.addBoth(results.append)
        self.fx.flush()
        dave = self.fx.add_member(self.owner, "dave")
        held.release()
        self.fx.flush()
        self.assertRefused(results[0].value, "sealed_keys_mismatch", missing=[dave.pubkey])
        self.fx.broker.mesh_keys._store = held._store
        self.assertEqual(result_of(self.fx.store.current_key_epoch(self.mesh_id)), 0)

    def test_two_admins_rotating_at_once(self):
        """Carol's parts, then the owner's whole rotation: carol's last part is a conflict."""
        carol_key = crypto.new_mesh_key()
        self.part(self.carol, carol_key, [self.owner, self.alice])
        reply, owner_key = self.rotate(members=self.members())
        self.assertTrue(reply["committed"])
        reply = self.part(self.carol, carol_key, [self.bob, self.carol], more=False)
        self.assertRefused(reply, "key_epoch_conflict", currentEpoch=1)
        self.assertEqual(self.fetch(self.bob, 1), owner_key)
        self.assertStillWorking(1)

    def test_demoted_admin_cannot_finish(self):
        """An admin demoted between two parts is forbidden at the last; nothing commits."""
        key = crypto.new_mesh_key()
        self.part(self.carol, key, [self.owner, self.alice])
        self.owner.request({"type": "set_role", "target": "carol", "role": "member"})
        reply = self.part(self.carol, key, [self.bob, self.carol], more=False)
        self.assertRefused(reply, "forbidden")
        self.assertEqual(result_of(self.fx.store.current_key_epoch(self.mesh_id)), 0)

    def test_parts_of_a_gone_connection_are_not_kept(self):
        """The parts of a connection that went away are dropped at the next sweep."""
        key = crypto.new_mesh_key()
        self.part(self.carol, key, [self.owner, self.alice])
        self.assertEqual(len(self.fx.broker.mesh_keys._staged), 1)
        self.carol.drop()
        self.fx.advance(core.SWEEP_INTERVAL)
        self.assertEqual(self.fx.broker.mesh_keys._staged, {})
        self.assertStillWorking(0)


def _decode(frame):
    from claudemesh import protocol

    return protocol.decode(json.dumps(frame))
