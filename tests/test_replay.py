# -*- test-case-name: tests.test_replay -*-
"""
Replayed and forged credentials (issue 8, "Hostile input"): each is refused
with its code, and nothing stored changes (L{store_snapshot}). Over memory
wires on a fake clock, and the hook route with in-memory requests.
"""

import json

from claudemesh import crypto
from claudemesh.invite import encode_token, sign_invite
from tests.test_hook import HookTestCase
from tests.test_ws import WireTestCase


class HelloReplayTests(WireTestCase):
    def refused(self, hello, code, close=None):
        """
        Send C{hello} on a fresh wire; assert error C{code} and close 1008
        C{close or code}, and that nothing stored changed.
        """
        before = self.snapshot()
        wire = self.wire()
        wire.send(hello)
        self.assertEqual([f.get("code") for f in wire.frames], [code])
        self.assertEqual(wire.client.close_info, (True, 1008, close or code))
        self.assertUnchanged(before)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_replayed_after_60s(self):
        """The same signed hello sent again 61 s later is refused with timestamp_skew."""
        hello = self.alice.hello_dict()
        first = self.wire()
        first.send(hello)
        self.assertEqual(first.last()["type"], "hello_ack")
        first.close()
        self.fx.advance(61)
        self.refused(hello, "timestamp_skew")

    def test_from_the_future(self):
        """A hello signed 61 s ahead of the broker's clock is refused the same way."""
        self.refused(self.alice.hello_dict(timestamp=self.fx.now_ms() + 61_000),
                     "timestamp_skew")

    def test_signed_for_another_mesh(self):
        """A hello whose signature was made for another mesh is bad_signature."""
        now = self.fx.now_ms()
        other = self.fx.create_mesh(name="other")
        hello = self.alice.hello_dict(timestamp=now)
        hello["signature"] = self.alice.identity.sign(crypto.hello_string(
            other.mesh.id, self.alice.member.id, self.alice.pubkey, now))
        self.refused(hello, "bad_signature")

    def test_signed_for_another_member_id(self):
        """A hello re-addressed to another member id is bad_signature."""
        hello = self.alice.hello_dict()
        hello["memberId"] = self.bob.member.id
        self.refused(hello, "bad_signature")

    def test_session_key_not_signed_by_member(self):
        """A session key whose proof is by another key is bad_session_pubkey."""
        hello = self.alice.hello_dict(session_key=True)
        hello["sessionSignature"] = self.bob.identity.sign(crypto.session_proof_string(
            self.alice.mesh.id, self.alice.pubkey, hello["sessionPubkey"]))
        self.refused(hello, "bad_session_pubkey")

    def test_session_proof_for_another_mesh(self):
        """A session proof made for another mesh does not prove the key here."""
        hello = self.alice.hello_dict(session_key=True)
        hello["sessionSignature"] = self.alice.identity.sign(crypto.session_proof_string(
            "another-mesh", self.alice.pubkey, hello["sessionPubkey"]))
        self.refused(hello, "bad_session_pubkey")

    def test_session_key_without_proof(self):
        """A session key without any proof is bad_session_pubkey."""
        hello = self.alice.hello_dict(session_key=True)
        del hello["sessionSignature"]
        self.refused(hello, "bad_session_pubkey")

    def test_someone_elses_session_key(self):
        """Claiming bob's proven session key with alice's identity is bad_session_pubkey."""
        bob_hello = self.bob.hello_dict(session_key=True)
        self.hello(self.bob, session_key=True)
        hello = self.alice.hello_dict(sessionPubkey=bob_hello["sessionPubkey"],
                                      sessionSignature=bob_hello["sessionSignature"])
        self.refused(hello, "bad_session_pubkey")


class JoinReplayTests(WireTestCase):
    def setUp(self):
        WireTestCase.setUp(self)
        self.owner_wire = self.hello(self.owner, session_id="owner")

    def invite(self, uses=1, role="member"):
        self.owner_wire.send({"type": "create_invite", "maxUses": uses, "role": role,
                              "_reqId": "i"})
        reply = self.owner_wire.last()
        self.assertEqual(reply["type"], "invite_created", reply)
        return reply

    def token(self, reply, signer=None, **changes):
        invite = sign_invite(signer or self.owner.identity, self.owner.mesh.id, "team",
                             reply["inviteId"], reply.get("role", "member"),
                             reply["expiresAt"], "ws://127.0.0.1:7777/ws")
        invite.update(changes)
        return encode_token(invite)

    def join_frame(self, token, invite_id, identity=None, name="mallory", timestamp=None):
        identity = identity or crypto.Identity.generate()
        now = self.fx.now_ms() if timestamp is None else timestamp
        return {"type": "join", "invite": token, "pubkey": identity.pubkey,
                "displayName": name, "timestamp": now,
                "signature": identity.sign(crypto.join_string(invite_id, identity.pubkey,
                                                              name, now))}

    def join(self, frame):
        wire = self.wire()
        wire.send(frame)
        return wire.last()

    def refused(self, frame, code):
        before = self.snapshot()
        reply = self.join(frame)
        self.assertEqual((reply["type"], reply.get("code")), ("error", code), reply)
        self.assertUnchanged(before)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_role_raised_in_token(self):
        """A token whose role was changed to admin after signing is invite_bad_signature."""
        reply = self.invite()
        self.refused(self.join_frame(self.token(reply, role="admin"), reply["inviteId"]),
                     "invite_bad_signature")

    def test_resigned_as_admin(self):
        """Re-signing the token as an admin invite (real invite id) is invite_bad_signature."""
        reply = self.invite()
        reply = dict(reply, role="admin")
        self.refused(self.join_frame(self.token(reply), reply["inviteId"]),
                     "invite_bad_signature")

    def test_signed_by_a_plain_member(self):
        """An invite signed by a member (not owner/admin) is invite_bad_signature."""
        reply = self.invite()
        token = self.token(reply, signer=self.alice.identity)
        self.refused(self.join_frame(token, reply["inviteId"]), "invite_bad_signature")

    def test_invented_invite_id(self):
        """An invite id the broker never issued is invite_not_found."""
        reply = dict(self.invite(), inviteId="f" * 32)
        self.refused(self.join_frame(self.token(reply), reply["inviteId"]), "invite_not_found")

    def test_reused_one_use_invite(self):
        """A second key joining with a one-use invite is invite_exhausted."""
        reply = self.invite()
        token = self.token(reply)
        self.assertEqual(self.join(self.join_frame(token, reply["inviteId"]))["type"],
                         "join_ack")
        self.refused(self.join_frame(token, reply["inviteId"], name="second"),
                     "invite_exhausted")

    def test_join_proof_replayed_after_60s(self):
        """The same join body sent 61 s later by someone else is bad_proof."""
        reply = self.invite(uses=5)
        frame = self.join_frame(self.token(reply), reply["inviteId"])
        self.fx.advance(61)
        self.refused(frame, "bad_proof")

    def test_proof_for_another_invite(self):
        """A join proof made for another invite id is bad_proof."""
        first, second = self.invite(), self.invite()
        frame = self.join_frame(self.token(second), first["inviteId"])
        self.refused(frame, "bad_proof")

    def test_revoked_invite(self):
        """A revoked invite is invite_revoked."""
        reply = self.invite()
        self.owner_wire.send({"type": "revoke_invite", "inviteId": reply["inviteId"]})
        self.refused(self.join_frame(self.token(reply), reply["inviteId"]), "invite_revoked")


class HookReplayTests(HookTestCase):
    def test_another_members_session(self):
        """A hook POST naming another member's session changes nothing of that session."""
        self.bob.connect(session_id="bobs")
        self.alice.connect(session_id="alices")
        before = self.snapshot()
        code, reply = self.post(self.body(session_id="bobs"))
        self.assertEqual((code, reply), (200, {"ok": True, "pending": True}))
        self.assertEqual(self.snapshot()[:2], before[:2])

    def test_replayed_after_60s(self):
        """The same signed hook request sent 61 s later is 401 and changes nothing."""
        self.alice.connect(session_id="a1")
        timestamp = self.fx.now_ms()
        self.fx.advance(61)
        before = self.snapshot()
        code, reply = self.post(self.body(session_id="a1"), timestamp=timestamp)
        self.assertEqual((code, reply["error"]), (401, "unauthorized"))
        self.assertEqual(self.snapshot(), before)

    def test_signed_for_another_mesh(self):
        """A hook request signed for another mesh id is 401."""
        self.alice.connect(session_id="a1")
        before = self.snapshot()
        raw = json.dumps(self.body(session_id="a1")).encode()
        now = self.fx.now_ms()
        signature = self.alice.identity.sign(crypto.hook_string("other-mesh", now, raw))
        code, reply = self.post(raw, timestamp=now, signature=signature)
        self.assertEqual((code, reply["error"]), (401, "unauthorized"))
        self.assertEqual(self.snapshot(), before)

    def test_body_swapped(self):
        """A signature over one body does not cover another (dnd instead of working): 401."""
        self.alice.connect(session_id="a1")
        before = self.snapshot()
        code, reply = self.post(self.body("dnd", session_id="a1"),
                                sign_body=b'{"status": "working"}')
        self.assertEqual((code, reply["error"]), (401, "unauthorized"))
        self.assertEqual(self.snapshot(), before)
