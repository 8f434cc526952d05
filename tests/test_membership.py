# -*- test-case-name: tests.test_membership -*-
"""
Tests for L{claudemesh.broker.membership}: meshes, invites, joins, roles and
the three removal tiers, driven through the core on an inline SQLite store.
"""

import json

from twisted.trial import unittest

from claudemesh import crypto, protocol
from claudemesh.invite import decode_token, encode_token, sign_invite
from claudemesh.protocol import Refusal
from tests.meshfixture import BrokerFixture, Peer

BROKER_URL = "ws://127.0.0.1:7900/ws"


def result_of(d):
    results = []
    d.addBoth(results.append)
    result = results[0]
    if hasattr(result, "value"):
        return result.value
    return result


class MembershipTestCase(unittest.TestCase):
    def setUp(self):
        self.fx = BrokerFixture()
        self.owner = self.fx.create_mesh()
        self.owner.connect()
        self.membership = self.fx.broker.membership

    def invite(self, by=None, role="member", uses=1, expires_in=3600):
        """
        Ask for an invite as C{by} and sign it: returns (token, reply).
        """
        by = by or self.owner
        reply = by.request({"type": "create_invite", "role": role, "maxUses": uses,
                            "expiresIn": expires_in})
        if isinstance(reply, Refusal):
            return None, reply
        invite = sign_invite(by.identity, by.mesh.id, by.mesh.name, reply["inviteId"], role,
                             reply["expiresAt"], BROKER_URL)
        return encode_token(invite), reply

    def join(self, token, identity=None, name="newbie", signer=None, timestamp=None):
        identity = identity or crypto.Identity.generate()
        timestamp = self.fx.now_ms() if timestamp is None else timestamp
        invite_id = decode_token(token)["inviteId"]
        signature = (signer or identity).sign(
            crypto.join_string(invite_id, identity.pubkey, name, timestamp))
        frame = protocol.decode(json.dumps({
            "type": "join", "invite": token, "pubkey": identity.pubkey, "displayName": name,
            "timestamp": timestamp, "signature": signature}))
        result = result_of(self.membership.join(frame))
        self.fx.flush()
        return identity, result

    def joined_peer(self, name, role="member"):
        token, _ = self.invite(role=role)
        identity, result = self.join(token, name=name)
        mesh = self.fx.broker.meshes.cached(self.owner.mesh.id)
        return Peer(self.fx, self.owner.mesh, mesh.members[result["memberId"]], identity)

    def audit_types(self):
        entries, _ = result_of(self.fx.store.audit_entries(self.owner.mesh.id, 500, 0))
        return [e.event_type for e in reversed(entries)]


class CreateMeshTests(MembershipTestCase):
    def body(self, identity=None, **changes):
        identity = identity or crypto.Identity.generate()
        now = self.fx.now_ms()
        body = {"name": "Team A", "ownerPubkey": identity.pubkey, "displayName": "me",
                "timestamp": now,
                "signature": identity.sign(crypto.create_mesh_string("Team A", identity.pubkey,
                                                                     now))}
        body.update(changes)
        return body

    def test_create(self):
        """A signed body creates the mesh and its owner."""
        reply = result_of(self.membership.create_mesh(self.body()))
        self.assertEqual((reply["name"], reply["slug"]), ("Team A", "team-a"))
        member = result_of(self.fx.store.get_member(reply["memberId"]))
        self.assertEqual(member.role, "owner")

    def test_bad_signature(self):
        """A signature by another key is refused and nothing is stored."""
        other = crypto.Identity.generate()
        body = self.body(signature=other.sign(b"nope"))
        e = result_of(self.membership.create_mesh(body))
        self.assertEqual(e.code, "bad_signature")

    def test_malformed(self):
        """A bad name is malformed, naming the field."""
        e = result_of(self.membership.create_mesh(self.body(name="a|b")))
        self.assertEqual(e.code, "malformed")
        self.assertIn("'name'", e.message)


class InviteJoinTests(MembershipTestCase):
    def test_join(self):
        """A signed invite and a valid proof make a member with the invite's role."""
        token, reply = self.invite(role="admin")
        _, result = self.join(token, name="carol")
        self.assertEqual(result["role"], "admin")
        self.assertEqual(result["meshId"], self.owner.mesh.id)
        self.assertIn("member_joined", self.audit_types())
        invites = self.owner.request({"type": "list_invites"})["invites"]
        self.assertEqual(invites[0]["usedCount"], 1)

    def test_rejoin_same_key(self):
        """Joining again with the same key returns the same member and takes no use."""
        token, _ = self.invite(uses=2)
        identity, first = self.join(token)
        _, second = self.join(token, identity=identity)
        self.assertEqual(first["memberId"], second["memberId"])
        invites = self.owner.request({"type": "list_invites"})["invites"]
        self.assertEqual(invites[0]["usedCount"], 1)

    def test_exhausted(self):
        """A one-use invite takes one joiner; the next gets invite_exhausted."""
        token, _ = self.invite()
        self.join(token)
        _, e = self.join(token)
        self.assertEqual(e.code, "invite_exhausted")

    def test_expired(self):
        """An invite past its expiry is refused."""
        token, _ = self.invite(expires_in=60)
        self.fx.advance(61)
        _, e = self.join(token)
        self.assertEqual(e.code, "invite_expired")

    def test_revoked_invite(self):
        """A revoked invite is refused."""
        token, reply = self.invite()
        ack = self.owner.request({"type": "revoke_invite", "inviteId": reply["inviteId"]})
        self.assertEqual(ack, {"type": "revoke_invite_ack", "inviteId": reply["inviteId"]})
        _, e = self.join(token)
        self.assertEqual(e.code, "invite_revoked")

    def test_forged_role(self):
        """A token whose role differs from the broker's row is invite_bad_signature."""
        _, reply = self.invite(role="member")
        forged = sign_invite(self.owner.identity, self.owner.mesh.id, "team", reply["inviteId"],
                             "admin", reply["expiresAt"], BROKER_URL)
        _, e = self.join(encode_token(forged))
        self.assertEqual(e.code, "invite_bad_signature")

    def test_forged_signature(self):
        """A token signed by someone else is invite_bad_signature."""
        _, reply = self.invite()
        mallory = crypto.Identity.generate()
        forged = sign_invite(mallory, self.owner.mesh.id, "team", reply["inviteId"], "member",
                             reply["expiresAt"], BROKER_URL)
        forged["inviterPubkey"] = self.owner.pubkey
        _, e = self.join(encode_token(forged))
        self.assertEqual(e.code, "invite_bad_signature")

    def test_unknown_invite(self):
        """An invite id the broker never issued is invite_not_found."""
        invite = sign_invite(self.owner.identity, self.owner.mesh.id, "team", "nope", "member",
                             9_999_999_999, BROKER_URL)
        _, e = self.join(encode_token(invite))
        self.assertEqual(e.code, "invite_not_found")

    def test_proof_by_another_key(self):
        """A join proof signed by a key other than the joining one is bad_proof."""
        token, _ = self.invite()
        _, e = self.join(token, signer=crypto.Identity.generate())
        self.assertEqual(e.code, "bad_proof")

    def test_admin_invites_members_only(self):
        """An admin may invite members but not admins; a member may not invite."""
        admin = self.joined_peer("adam", role="admin")
        admin.connect()
        _, e = self.invite(by=admin, role="admin")
        self.assertEqual(e.code, "forbidden")
        token, _ = self.invite(by=admin, role="member")
        self.assertIsNotNone(token)
        member = self.joined_peer("mo")
        member.connect()
        _, e = self.invite(by=member)
        self.assertEqual((e.code, e.message),
                         ("forbidden", "only owner or admin can create invites"))

    def test_banned_key_cannot_join(self):
        """A banned key is refused at join with error revoked."""
        token, _ = self.invite(uses=5)
        peer = self.joined_peer("eve")
        self.owner.request({"type": "ban", "target": "eve"})
        _, e = self.join(token, identity=peer.identity, name="eve")
        self.assertEqual(e.code, "revoked")
        self.assertEqual(e.close, (4002, "banned"))


class ModerationTests(MembershipTestCase):
    def setUp(self):
        MembershipTestCase.setUp(self)
        self.alice = self.joined_peer("alice")
        self.bob = self.joined_peer("bob")
        self.alice.connect()
        self.bob.connect()

    def test_kick(self):
        """kick closes 4001 kicked, sends peer_left at once, changes nothing stored."""
        reply = self.owner.request({"type": "kick", "target": "bob", "_reqId": "k"})
        self.assertEqual(reply["kicked"], ["bob"])
        self.assertEqual(reply["affected"], ["bob"])
        self.assertEqual(self.bob.connection.closed, (4001, "kicked"))
        self.assertEqual(len(self.alice.connection.events("peer_left")), 1)
        member = result_of(self.fx.store.get_member(self.bob.member.id))
        self.assertIsNone(member.revoked_at)

    def test_disconnect_enters_grace(self):
        """disconnect closes 1000 disconnected and the session stays in grace."""
        self.alice.connection.clear()
        reply = self.owner.request({"type": "disconnect", "target": "bob"})
        self.assertEqual(reply["affected"], ["bob"])
        self.assertEqual(self.bob.connection.closed, (1000, "disconnected"))
        self.assertEqual(self.alice.connection.events("peer_left"), [])
        self.bob.connect()
        self.assertEqual(self.alice.connection.events(), [])

    def test_ban(self):
        """ban sends error revoked, closes 4002 banned, and the key is refused at hello."""
        reply = self.owner.request({"type": "ban", "target": self.bob.pubkey[:10]})
        self.assertEqual(reply, {"type": "ban_ack", "banned": "bob"})
        [error] = self.bob.connection.of_type("error")
        self.assertEqual(error["code"], "revoked")
        self.assertEqual(error["message"],
                         'You\'ve been removed from "team". Contact the mesh owner to rejoin.')
        self.assertEqual(self.bob.connection.closed, (4002, "banned"))
        with self.assertRaises(Refusal) as caught:
            self.bob.connect()
        self.assertEqual(caught.exception.close, (4002, "banned"))
        bans = self.owner.request({"type": "list_bans"})["bans"]
        self.assertEqual([b["name"] for b in bans], ["bob"])

    def test_unban_releases_queued(self):
        """After unban the member connects again and gets what was queued for it."""
        self.owner.request({"type": "ban", "target": "bob"})
        self.alice.send(self.bob.pubkey)  # refused: banned key
        reply = self.owner.request({"type": "unban", "target": "bob"})
        self.assertEqual(reply, {"type": "unban_ack", "unbanned": "bob"})
        ack = self.alice.send(self.bob.pubkey)
        self.assertTrue(ack["queued"])
        self.bob.connect(session_id="s2")
        self.assertEqual(len(self.bob.connection.messages()), 1)

    def test_member_cannot_moderate(self):
        """A member gets forbidden with the verb in the message."""
        for verb in ("kick", "disconnect", "ban", "unban"):
            e = self.alice.request({"type": verb, "target": "bob"})
            self.assertEqual((e.code, e.message),
                             ("forbidden", "only owner or admin can %s" % verb))
        self.assertIsNone(self.bob.connection.closed)

    def test_owner_never_target(self):
        """Nobody can kick or ban the owner."""
        admin = self.joined_peer("adam", role="admin")
        admin.connect()
        e = admin.request({"type": "kick", "target": "owner"})
        self.assertEqual(e.code, "forbidden")
        e = admin.request({"type": "ban", "target": "owner"})
        self.assertEqual(e.code, "forbidden")

    def test_admin_vs_admin(self):
        """An admin cannot kick another admin; the owner can."""
        a1 = self.joined_peer("a1", role="admin")
        a2 = self.joined_peer("a2", role="admin")
        a1.connect()
        a2.connect()
        e = a1.request({"type": "kick", "target": "a2"})
        self.assertEqual(e.code, "forbidden")
        self.assertEqual(self.owner.request({"type": "kick", "target": "a2"})["kicked"], ["a2"])

    def test_self_ban(self):
        """Nobody can ban themselves."""
        admin = self.joined_peer("adam", role="admin")
        admin.connect()
        e = admin.request({"type": "ban", "target": "adam"})
        self.assertEqual(e.code, "invalid")

    def test_unknown_and_ambiguous(self):
        """An unknown target is not_found; a name shared by two members is ambiguous."""
        e = self.owner.request({"type": "kick", "target": "nobody"})
        self.assertEqual((e.code, e.message), ("not_found", 'peer "nobody" not found'))
        twin = self.joined_peer("bob")
        twin.connect(session_id="twin")
        e = self.owner.request({"type": "kick", "target": "bob"})
        self.assertEqual(e.code, "ambiguous")
        self.assertEqual(len(e.extra["candidates"]), 2)

    def test_all_excludes_caller(self):
        """kick all never includes the caller's own sessions."""
        self.owner.connect(session_id="second")
        first = self.owner.connection
        reply = self.owner.request({"type": "kick", "all": True})
        self.assertEqual(sorted(reply["kicked"]), ["alice", "bob"])
        self.assertIsNone(first.closed)

    def test_stale(self):
        """kick stale picks sessions silent for longer than the given ms."""
        self.fx.advance(20)
        self.alice.request({"type": "list_peers"})
        reply = self.owner.request({"type": "kick", "stale": 10_000})
        self.assertEqual(reply["kicked"], ["bob"])
        self.assertEqual(self.bob.connection.closed, (4001, "kicked_stale"))

    def test_roles(self):
        """The owner promotes a member, and hands ownership over; the old owner becomes admin."""
        e = self.alice.request({"type": "set_role", "target": "bob", "role": "admin"})
        self.assertEqual(e.code, "forbidden")
        reply = self.owner.request({"type": "set_role", "target": "alice", "role": "owner"})
        self.assertEqual(reply, {"type": "set_role_ack", "target": "alice", "role": "owner"})
        members = {m["name"]: m["role"] for m in
                   self.alice.request({"type": "list_members"})["members"]}
        self.assertEqual(members["owner"], "admin")
        self.assertEqual(members["alice"], "owner")

    def test_leave(self):
        """A member leaves; an owner must hand ownership over first."""
        e = self.owner.request({"type": "leave"})
        self.assertEqual(e.code, "invalid")
        self.assertEqual(self.bob.request({"type": "leave"}), {"type": "leave_ack"})
        self.fx.flush()
        names = [m["name"] for m in self.owner.request({"type": "list_members"})["members"]]
        self.assertNotIn("bob", names)

    def test_audit_chain(self):
        """After moderation the audit chain verifies, and audit reads are admin-only."""
        self.owner.request({"type": "kick", "target": "bob"})
        self.owner.request({"type": "ban", "target": "alice"})
        reply = self.owner.request({"type": "audit_verify"})
        self.assertTrue(reply["valid"])
        types = self.audit_types()
        for event in ("member_joined", "invite_created", "member_kicked", "member_banned"):
            self.assertIn(event, types)
        carol = self.joined_peer("carol")
        carol.connect()
        e = carol.request({"type": "audit_query"})
        self.assertEqual(e.code, "forbidden")


class OneTransactionTests(MembershipTestCase):
    """
    Each membership action is stored whole or not at all: a failure injected
    into any of its statements (a SQLite trigger that aborts it) leaves
    nothing of it behind, neither in the store nor in its audit chain.
    """

    def setUp(self):
        MembershipTestCase.setUp(self)
        self.alice = self.joined_peer("alice")
        self.alice.connect()

    def fail_updates(self, table, when="1"):
        """
        Make every UPDATE of C{table} whose new row matches C{when} abort.
        """
        sql = ("CREATE TRIGGER injected_failure BEFORE UPDATE ON %s WHEN %s"
               " BEGIN SELECT RAISE(ABORT, 'injected failure'); END" % (table, when))
        result_of(self.fx.store._connection.run(lambda connection: connection.execute(sql)))

    def stored_member(self, peer):
        return result_of(self.fx.store.get_member(peer.member.id))

    def test_ban_is_one_transaction(self):
        """A ban whose invite revocation fails leaves the member unbanned and unaudited."""
        self.fail_updates("invites")
        before = self.audit_types()
        self.owner.request({"type": "ban", "target": "alice"})
        self.fx.flush()
        self.assertIsNone(self.stored_member(self.alice).revoked_at)
        self.assertEqual(self.audit_types(), before)
        self.assertIsNone(self.alice.connection.closed)

    def test_hand_over_is_one_transaction(self):
        """A hand-over whose demotion of the old owner fails leaves exactly one owner."""
        self.fail_updates("members", "NEW.role = 'admin'")
        self.owner.request({"type": "set_role", "target": "alice", "role": "owner"})
        self.fx.flush()
        members = result_of(self.fx.store.list_members(self.owner.mesh.id))
        self.assertEqual([m.display_name for m in members if m.role == "owner"], ["owner"])

    def test_duplicate_join_keeps_the_invite_use(self):
        """A key that joined behind the broker's back re-joins without taking a use."""
        token, reply = self.invite(uses=1)
        identity = crypto.Identity.generate()
        # The key is a member in the store but not (yet) in the broker's
        # cached mesh, as after a join through another broker process.
        from claudemesh.store.records import MemberRecord

        result_of(self.fx.store.add_member(MemberRecord(
            "mem-elsewhere", self.owner.mesh.id, identity.pubkey, "twin", "member",
            self.fx.now_ms())))
        _, result = self.join(token, identity=identity, name="twin")
        self.assertEqual(result["memberId"], "mem-elsewhere")
        invite = result_of(self.fx.store.get_invite(reply["inviteId"]))
        self.assertEqual(invite.used_count, 0)
        # The use is still there for someone else.
        _, other = self.join(token, name="someone")
        self.assertEqual(other["role"], "member")
