"""
Tests for L{claudemesh.store}: one suite, L{StoreTestsMixin}, run against
each provider of L{IStore} (SQLite in adbapi's thread, SQLite inline, Postgres), plus the pieces
around them (schema files, L{make_store}, L{StoreService}).

The SQL stores are integration tests against real databases on trial's
reactor; the Postgres ones skip when no server is reachable (see C{tests.pg}).
"""

import itertools
import os
import sqlite3
import stat
import time

import attr
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from claudemesh.audit import GENESIS, chain_hash
from claudemesh.store import (
    DuplicateKey,
    IStore,
    PostgresStore,
    SchemaTooNew,
    SQLiteStore,
    StoreService,
    StoreUnavailable,
    describe_store,
    make_store,
)
from claudemesh.store import sqlite as sqlite_module
from claudemesh.store.postgres import safe_dsn
from claudemesh.store.records import (
    AuditEvent,
    ClaimRequest,
    InviteRecord,
    MemberRecord,
    MeshRecord,
    NewDelivery,
    NewMessage,
    SessionKeyBinding,
    SessionRecord,
    WriteBatch,
)
from claudemesh.store.schema import CURRENT_VERSION, full_schema, split_statements
from claudemesh.store.sql.operations import Query
from tests import pg

NOW = 1_700_000_000_000


class InjectedFailure(Exception):
    """
    Raised inside a transaction by L{StoreFixture.assertAllOrNothing}.
    """

HOUR = 3600 * 1000
LEASE = 30_000
ALL = ("now", "next", "low")

PG_DSN, PG_SKIP = pg.postgres_dsn_or_skip_reason()


class StoreFixture:
    """
    An open store and the record builders every store suite uses (this one,
    the mesh key and the nodes halves); a concrete class provides
    C{makeStore()}.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self._ids = itertools.count(1)
        self.store = yield self.openStore(self.makeStore())

    @defer.inlineCallbacks
    def openStore(self, store):
        yield store.open()
        self.addCleanup(store.close)
        return store

    # -- building records -----------------------------------------------------

    def _id(self, prefix):
        return "%s-%d" % (prefix, next(self._ids))

    @defer.inlineCallbacks
    def makeMesh(self):
        mesh = MeshRecord(self._id("mesh"), "Team", "team", self._id("ownerkey"), NOW)
        owner = MemberRecord(
            self._id("member"), mesh.id, mesh.owner_pubkey, "owner", "owner", NOW
        )
        yield self.store.create_mesh(mesh, owner)
        return mesh, owner

    @defer.inlineCallbacks
    def addMember(self, mesh, joined_at=NOW, **kwargs):
        member = MemberRecord(
            self._id("member"),
            mesh.id,
            self._id("key"),
            kwargs.pop("display_name", "peer"),
            kwargs.pop("role", "member"),
            joined_at,
            **kwargs,
        )
        yield self.store.add_member(member)
        return member

    def makeInvite(self, mesh, **kwargs):
        values = dict(
            id=self._id("invite"),
            mesh_id=mesh.id,
            role="member",
            max_uses=1,
            expires_at=NOW + HOUR,
            created_by="owner",
            created_at=NOW,
        )
        values.update(kwargs)
        return InviteRecord(**values)

    def makeSession(self, mesh, member, **kwargs):
        values = dict(
            presence_id=self._id("presence"),
            mesh_id=mesh.id,
            member_id=member.id,
            session_id=self._id("session"),
            display_name="peer",
            pid=4242,
            cwd="/home/peer",
            connected_at=NOW,
        )
        values.update(kwargs)
        return SessionRecord(**values)

    def makeMessage(self, mesh, sender, deliveries, **kwargs):
        values = dict(
            id=self._id("msg"),
            mesh_id=mesh.id,
            sender_member_id=sender.id,
            sender_pubkey=sender.pubkey,
            sender_member_pubkey=sender.pubkey,
            target_spec="@everyone",
            priority="next",
            nonce=self._id("nonce"),
            ciphertext=self._id("ciphertext"),
            created_at=NOW,
            expires_at=NOW + HOUR,
            deliveries=tuple(deliveries),
        )
        values.update(kwargs)
        return NewMessage(**values)

    @defer.inlineCallbacks
    def meshWithRecipient(self):
        """
        A mesh, its owner (the sender) and one more member (the recipient).
        """
        mesh, owner = yield self.makeMesh()
        bob = yield self.addMember(mesh, display_name="bob")
        return mesh, owner, bob

    def claim(self, member, presence_id="p1", session_pubkey=None, groups=(),
              priorities=ALL, now=NOW, limit=10):
        return self.store.claim_deliveries(ClaimRequest(
            member.id, session_pubkey, presence_id, tuple(groups), tuple(priorities), now,
            LEASE, limit))

    @defer.inlineCallbacks
    def auditTypes(self, mesh):
        """
        The event types of a mesh's audit chain, oldest first.
        """
        entries, _ = yield self.store.audit_entries(mesh.id, 1000, 0)
        return [entry.event_type for entry in reversed(entries)]

    def event(self, mesh, event_type, **payload):
        return AuditEvent(mesh.id, event_type, None, payload, NOW)

    def joiner(self, mesh, invite, key=None):
        return MemberRecord(self._id("member"), mesh.id, key or self._id("key"), "joiner",
                            invite.role, NOW, invite_id=invite.id)

    # -- all or nothing -------------------------------------------------------

    # The tables whose rows L{dump} compares (a suite of another domain adds
    # its own).
    DUMPED_TABLES = ("meshes", "members", "invites", "sessions", "messages", "deliveries",
                     "send_keys", "audit_log")

    @defer.inlineCallbacks
    def dump(self):
        """
        Every row of every table, for comparing the whole database.
        """

        def dump_txn():
            rows = {}
            for table in self.DUMPED_TABLES:
                found = yield Query("SELECT * FROM %s" % (table,))
                rows[table] = sorted(tuple(str(value) for value in row) for row in found)
            return rows

        return (yield self.store.run_interaction("dump", dump_txn, write=False))

    @defer.inlineCallbacks
    def assertAllOrNothing(self, action):
        """
        Run C{action()} (a store call) with a failure injected after its
        first, second, … statement until it succeeds, asserting after each
        failed attempt that the database is exactly as before; then assert
        that the action changed something.
        """
        before = yield self.dump()
        real = self.store.run_interaction
        for allowed in range(1, 100):

            def failing(desc, txn_function, *args, write=True, allowed=allowed):
                def counted(*inner):
                    steps = txn_function(*inner)
                    result = None
                    for _ in range(allowed):
                        try:
                            operation = steps.send(result)
                        except StopIteration as stop:
                            return stop.value
                        result = yield operation
                    raise InjectedFailure("after %d statements of %s" % (allowed, desc))

                return real(desc, counted, *args, write=write)

            self.store.run_interaction = failing
            try:
                yield action()
            except InjectedFailure:
                failed = True
            else:
                failed = False
            finally:
                self.store.run_interaction = real
            if not failed:
                break
            self.assertEqual((yield self.dump()), before, "half-done after %d" % (allowed,))
        self.assertGreater(allowed, 1, "the action ran no statement")
        self.assertNotEqual((yield self.dump()), before)


class StoreTestsMixin(StoreFixture):
    """
    The behaviour every L{IStore} provider shares. A concrete class provides
    C{makeStore()}, C{reopenStore()} (a store on the same data, not yet
    open), C{_tamper_audit(mesh_id, seq)}, C{_schema_version()} and
    C{_set_schema_version(version)}.
    """

    # -- the store itself -------------------------------------------------------

    def test_provides_interface(self):
        """The store provides IStore and names its kind."""
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertIn(self.store.kind, ("sqlite", "postgres"))

    @defer.inlineCallbacks
    def test_ping(self):
        """An open store answers a ping."""
        result = yield self.store.ping()
        self.assertIsNone(result)

    @defer.inlineCallbacks
    def test_closed_store_unavailable(self):
        """A closed store fails calls with StoreUnavailable rather than hanging."""
        yield self.store.close()
        yield self.assertFailure(self.store.ping(), StoreUnavailable)
        yield self.assertFailure(self.store.get_mesh("x"), StoreUnavailable)

    # -- meshes and members -----------------------------------------------------

    @defer.inlineCallbacks
    def test_create_and_get_mesh(self):
        """A created mesh and its owner can be read back; unknown ids give None."""
        mesh, owner = yield self.makeMesh()
        self.assertEqual((yield self.store.get_mesh(mesh.id)), mesh)
        self.assertEqual((yield self.store.get_member(owner.id)), owner)
        self.assertIsNone((yield self.store.get_mesh("nope")))
        self.assertIsNone((yield self.store.get_member("nope")))

    @defer.inlineCallbacks
    def test_duplicate_mesh(self):
        """Creating a mesh with an existing id fails with DuplicateKey."""
        mesh, owner = yield self.makeMesh()
        other_owner = MemberRecord("member-other", mesh.id, "otherkey", "o", "owner", NOW)
        yield self.assertFailure(self.store.create_mesh(mesh, other_owner), DuplicateKey)
        self.assertIsNone((yield self.store.get_member("member-other")))

    @defer.inlineCallbacks
    def test_create_mesh_atomic(self):
        """When the owner cannot be stored, neither is the mesh."""
        mesh, owner = yield self.makeMesh()
        second = MeshRecord("mesh-second", "Two", "two", "k2", NOW)
        yield self.assertFailure(self.store.create_mesh(second, owner), DuplicateKey)
        self.assertIsNone((yield self.store.get_mesh("mesh-second")))

    @defer.inlineCallbacks
    def test_members(self):
        """Members can be added, found by key and listed oldest first, revoked included."""
        mesh, owner = yield self.makeMesh()
        late = yield self.addMember(mesh, joined_at=NOW + 20, invite_id="inv-1")
        early = yield self.addMember(mesh, joined_at=NOW + 10, revoked_at=NOW + 30)
        other_mesh, other_owner = yield self.makeMesh()
        self.assertEqual((yield self.store.find_member(mesh.id, late.pubkey)), late)
        self.assertIsNone((yield self.store.find_member(other_mesh.id, late.pubkey)))
        self.assertEqual(
            (yield self.store.list_members(mesh.id)), [owner, early, late]
        )

    @defer.inlineCallbacks
    def test_duplicate_member(self):
        """A second membership of the same key in a mesh, or a reused id, is a DuplicateKey."""
        mesh, owner = yield self.makeMesh()
        member = yield self.addMember(mesh)
        same_key = MemberRecord("member-x", mesh.id, member.pubkey, "again", "member", NOW)
        yield self.assertFailure(self.store.add_member(same_key), DuplicateKey)
        same_id = MemberRecord(member.id, mesh.id, "fresh-key", "again", "member", NOW)
        yield self.assertFailure(self.store.add_member(same_id), DuplicateKey)
        other_mesh, _ = yield self.makeMesh()
        elsewhere = MemberRecord("member-y", other_mesh.id, member.pubkey, "b", "member", NOW)
        yield self.store.add_member(elsewhere)
        self.assertEqual((yield self.store.get_member("member-y")), elsewhere)

    @defer.inlineCallbacks
    def test_member_role(self):
        """A role change applies to an existing member only, with its audit entry."""
        mesh, owner = yield self.makeMesh()
        member = yield self.addMember(mesh)
        changed = [self.event(mesh, "role_changed")]
        self.assertTrue((yield self.store.set_member_role(member.id, "admin", NOW, changed)))
        self.assertEqual((yield self.store.get_member(member.id)).role, "admin")
        self.assertFalse((yield self.store.set_member_role("nope", "admin", NOW, changed)))
        self.assertEqual((yield self.auditTypes(mesh)), ["role_changed"])

    @defer.inlineCallbacks
    def test_hand_over_ownership(self):
        """Ownership moves to the heir and the old owner becomes an admin, together."""
        mesh, owner = yield self.makeMesh()
        heir = yield self.addMember(mesh)
        event = [self.event(mesh, "role_changed")]
        self.assertTrue((yield self.store.hand_over_ownership(owner.id, heir.id, NOW, event)))
        roles = {m.id: m.role for m in (yield self.store.list_members(mesh.id))}
        self.assertEqual(roles, {owner.id: "admin", heir.id: "owner"})
        self.assertFalse((yield self.store.hand_over_ownership(heir.id, "nope", NOW, event)))
        self.assertEqual((yield self.auditTypes(mesh)), ["role_changed"])

    @defer.inlineCallbacks
    def test_invites_die_with_the_right_to_make_them(self):
        """Demotion, hand-over and ban revoke the invites the new standing could not make."""
        mesh, owner = yield self.makeMesh()
        admin = yield self.addMember(mesh, role="admin")
        heir = yield self.addMember(mesh)
        by_admin = self.makeInvite(mesh, created_by=admin.id)
        owner_admin = self.makeInvite(mesh, created_by=owner.id, role="admin")
        owner_member = self.makeInvite(mesh, created_by=owner.id)
        for invite in (by_admin, owner_admin, owner_member):
            yield self.store.create_invite(invite)
        yield self.store.set_member_role(admin.id, "member", NOW + 1)
        yield self.store.set_member_role(admin.id, "admin", NOW + 2)
        yield self.store.hand_over_ownership(owner.id, heir.id, NOW + 3)
        revoked = {i.id: i.revoked_at for i in (yield self.store.list_invites(mesh.id))}
        self.assertEqual(revoked, {by_admin.id: NOW + 1, owner_admin.id: NOW + 3,
                                   owner_member.id: None})
        yield self.store.ban_member(owner.id, NOW + 4)
        revoked = {i.id: i.revoked_at for i in (yield self.store.list_invites(mesh.id))}
        self.assertEqual(revoked[owner_member.id], NOW + 4)

    @defer.inlineCallbacks
    def test_ban_and_unban(self):
        """A ban revokes the member and the invite it joined with; an unban lifts it, once each."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, max_uses=5)
        yield self.store.create_invite(invite)
        member = yield self.addMember(mesh, invite_id=invite.id)
        banned = [self.event(mesh, "member_banned")]
        self.assertTrue((yield self.store.ban_member(member.id, NOW + 5, banned)))
        self.assertFalse((yield self.store.ban_member(member.id, NOW + 6, banned)))
        self.assertEqual((yield self.store.get_member(member.id)).revoked_at, NOW + 5)
        self.assertEqual((yield self.store.get_invite(invite.id)).revoked_at, NOW + 5)
        unbanned = [self.event(mesh, "member_unbanned")]
        self.assertTrue((yield self.store.unban_member(member.id, unbanned)))
        self.assertFalse((yield self.store.unban_member(member.id, unbanned)))
        self.assertIsNone((yield self.store.get_member(member.id)).revoked_at)
        self.assertFalse((yield self.store.ban_member("nope", NOW, banned)))
        self.assertEqual((yield self.auditTypes(mesh)), ["member_banned", "member_unbanned"])

    @defer.inlineCallbacks
    def test_remove_member(self):
        """Removing a member deletes it and its pending deliveries, once."""
        mesh, owner, bob = yield self.meshWithRecipient()
        carol = yield self.addMember(mesh)
        message = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id), NewDelivery(carol.id)]
        )
        yield self.store.enqueue([message])
        left = [self.event(mesh, "member_left")]
        self.assertTrue((yield self.store.remove_member(bob.id, left)))
        self.assertFalse((yield self.store.remove_member(bob.id, left)))
        self.assertEqual((yield self.auditTypes(mesh)), ["member_left"])
        self.assertIsNone((yield self.store.get_member(bob.id)))
        deliveries = yield self.store.message_deliveries(message.id)
        self.assertEqual([d.recipient_key for d in deliveries], [carol.id])

    # -- invites ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_invites(self):
        """Invites can be stored, read back and listed oldest first."""
        mesh, owner = yield self.makeMesh()
        second = self.makeInvite(mesh, created_at=NOW + 1, max_uses=5, role="admin")
        first = self.makeInvite(mesh)
        yield self.store.create_invite(second)
        yield self.store.create_invite(first)
        self.assertEqual((yield self.store.get_invite(first.id)), first)
        self.assertIsNone((yield self.store.get_invite("nope")))
        self.assertEqual((yield self.store.list_invites(mesh.id)), [first, second])
        yield self.assertFailure(self.store.create_invite(first), DuplicateKey)

    @defer.inlineCallbacks
    def test_join_until_exhausted(self):
        """An invite gives exactly max_uses joins, each with its audit entry."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, max_uses=2)
        yield self.store.create_invite(invite, [self.event(mesh, "invite_created")])
        outcomes = []
        for _ in range(3):
            member = self.joiner(mesh, invite)
            outcome = yield self.store.join_member(
                member, NOW, [self.event(mesh, "member_joined")])
            outcomes.append((outcome.member == member, outcome.joined))
        self.assertEqual(outcomes, [(True, True), (True, True), (False, False)])
        self.assertEqual((yield self.store.get_invite(invite.id)).used_count, 2)
        self.assertEqual((yield self.auditTypes(mesh)),
                         ["invite_created", "member_joined", "member_joined"])

    @defer.inlineCallbacks
    def test_rejoin_takes_no_use(self):
        """A key that is a member already gets its membership back; no use is taken."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, max_uses=1)
        yield self.store.create_invite(invite)
        first = self.joiner(mesh, invite, key="the-key")
        yield self.store.join_member(first, NOW)
        again = yield self.store.join_member(self.joiner(mesh, invite, key="the-key"), NOW)
        self.assertEqual((again.member, again.joined), (first, False))
        self.assertEqual((yield self.store.get_invite(invite.id)).used_count, 1)

    @defer.inlineCallbacks
    def test_join_expired(self):
        """An invite cannot be used at or after its expiry."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, expires_at=NOW + 10)
        yield self.store.create_invite(invite)
        late = yield self.store.join_member(self.joiner(mesh, invite), NOW + 10)
        self.assertIsNone(late.member)
        on_time = yield self.store.join_member(self.joiner(mesh, invite), NOW + 9)
        self.assertTrue(on_time.joined)

    @defer.inlineCallbacks
    def test_join_revoked(self):
        """A revoked or unknown invite cannot be used; revoking twice reports False."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, max_uses=10)
        yield self.store.create_invite(invite)
        revoked = [self.event(mesh, "invite_revoked")]
        self.assertTrue((yield self.store.revoke_invite(invite.id, NOW + 1, revoked)))
        self.assertFalse((yield self.store.revoke_invite(invite.id, NOW + 2, revoked)))
        self.assertEqual((yield self.store.get_invite(invite.id)).revoked_at, NOW + 1)
        self.assertIsNone((yield self.store.join_member(self.joiner(mesh, invite), NOW)).member)
        stranger = MemberRecord("m-x", mesh.id, "k-x", "x", "member", NOW, invite_id="nope")
        self.assertIsNone((yield self.store.join_member(stranger, NOW)).member)
        self.assertFalse((yield self.store.revoke_invite("nope", NOW, revoked)))
        self.assertEqual((yield self.auditTypes(mesh)), ["invite_revoked"])
        self.assertEqual((yield self.store.list_members(mesh.id)), [owner])

    @defer.inlineCallbacks
    def test_concurrent_joins(self):
        """Of N concurrent joins of a one-use invite exactly one is stored."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, max_uses=1)
        yield self.store.create_invite(invite)
        outcomes = yield defer.gatherResults(
            [self.store.join_member(self.joiner(mesh, invite), NOW) for _ in range(12)],
            consumeErrors=True,
        )
        self.assertEqual(sorted(o.joined for o in outcomes), [False] * 11 + [True])
        self.assertEqual((yield self.store.get_invite(invite.id)).used_count, 1)
        self.assertEqual(len((yield self.store.list_members(mesh.id))), 2)

    @defer.inlineCallbacks
    def test_duplicate_join_takes_no_use(self):
        """A join whose member row clashes fails with DuplicateKey and keeps the invite's use."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, max_uses=1)
        yield self.store.create_invite(invite)
        clash = attr.evolve(self.joiner(mesh, invite), id=owner.id)
        yield self.assertFailure(
            self.store.join_member(clash, NOW, [self.event(mesh, "member_joined")]),
            DuplicateKey)
        self.assertEqual((yield self.store.get_invite(invite.id)).used_count, 0)
        self.assertEqual((yield self.auditTypes(mesh)), [])

    # -- one transaction per action -------------------------------------------

    @defer.inlineCallbacks
    def test_membership_actions_all_or_nothing(self):
        """Every membership action, failed after any of its statements, leaves nothing behind."""
        mesh, owner = yield self.makeMesh()
        invite = self.makeInvite(mesh, max_uses=5)
        yield self.assertAllOrNothing(
            lambda: self.store.create_invite(invite, [self.event(mesh, "invite_created")]))
        member = self.joiner(mesh, invite)
        yield self.assertAllOrNothing(
            lambda: self.store.join_member(member, NOW, [self.event(mesh, "member_joined")]))
        yield self.assertAllOrNothing(lambda: self.store.set_member_role(
            member.id, "admin", NOW, [self.event(mesh, "role_changed")]))
        yield self.assertAllOrNothing(lambda: self.store.hand_over_ownership(
            owner.id, member.id, NOW, [self.event(mesh, "role_changed")]))
        yield self.assertAllOrNothing(lambda: self.store.ban_member(
            owner.id, NOW, [self.event(mesh, "member_banned")]))
        yield self.assertAllOrNothing(lambda: self.store.unban_member(
            owner.id, [self.event(mesh, "member_unbanned")]))
        yield self.assertAllOrNothing(lambda: self.store.revoke_invite(
            invite.id, NOW, [self.event(mesh, "invite_revoked")]))
        yield self.assertAllOrNothing(lambda: self.store.remove_member(
            owner.id, [self.event(mesh, "member_left")]))
        other = MeshRecord(self._id("mesh"), "Two", "two", "k-two", NOW)
        yield self.assertAllOrNothing(lambda: self.store.create_mesh(
            other, MemberRecord(self._id("member"), other.id, "k-two", "o", "owner", NOW),
            [AuditEvent(other.id, "mesh_created", None, {}, NOW)]))

    @defer.inlineCallbacks
    def test_session_batch_all_or_nothing(self):
        """A batch that opens and closes sessions with their audit events is all or nothing."""
        mesh, owner, bob = yield self.meshWithRecipient()
        one = self.makeSession(mesh, bob)
        yield self.store.open_sessions([one])
        message = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([message])
        yield self.claim(bob, one.presence_id)
        two = self.makeSession(mesh, bob)
        batch = WriteBatch(
            opens=(two,), audit=(self.event(mesh, "peer_joined"),
                                 self.event(mesh, "peer_left")),
            acks=((message.id, bob.id, bob.id),), closes=((one.presence_id, NOW + 1),),
            now=NOW + 1)
        yield self.assertAllOrNothing(lambda: self.store.write_batch(batch))

    # -- sessions ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_open_and_list_sessions(self):
        """Open sessions are listed per mesh, oldest first, with every field intact."""
        mesh, owner, bob = yield self.meshWithRecipient()
        other_mesh, other_owner = yield self.makeMesh()
        full = self.makeSession(
            mesh, bob, connected_at=NOW + 5, session_pubkey="spk", claude_session_id="c",
            hostname="host", peer_type="claude", channel="ch", model="opus",
            groups=("ops", "dev"), status="working", status_source="hook",
            status_updated_at=NOW + 6, summary="fixing", receive=False,
            last_active_at=NOW + 7,
        )
        plain = self.makeSession(mesh, owner)
        elsewhere = self.makeSession(other_mesh, other_owner)
        yield self.store.open_sessions([full, plain, elsewhere])
        self.assertEqual((yield self.store.list_open_sessions(mesh.id)), [plain, full])

    @defer.inlineCallbacks
    def test_open_sessions_replaces(self):
        """Opening a session again with the same presence id replaces it."""
        mesh, owner = yield self.makeMesh()
        session = self.makeSession(mesh, owner)
        yield self.store.open_sessions([session])
        again = self.makeSession(
            mesh, owner, presence_id=session.presence_id, display_name="renamed"
        )
        yield self.store.open_sessions([again])
        self.assertEqual((yield self.store.list_open_sessions(mesh.id)), [again])

    @defer.inlineCallbacks
    def test_update_sessions(self):
        """Updates change only the named columns; a later update of a column wins."""
        mesh, owner = yield self.makeMesh()
        one = self.makeSession(mesh, owner, summary="old")
        two = self.makeSession(mesh, owner, connected_at=NOW + 1)
        yield self.store.open_sessions([one, two])
        yield self.store.update_sessions(
            [
                (one.presence_id, {"status": "working", "status_source": "hook",
                                   "status_updated_at": NOW + 9, "summary": None}),
                (two.presence_id, {"groups": ("a", "b"), "display_name": "two"}),
                (two.presence_id, {"display_name": "later", "last_active_at": NOW + 3}),
                ("unknown", {"status": "dnd"}),
            ]
        )
        sessions = yield self.store.list_open_sessions(mesh.id)
        self.assertEqual(
            sessions,
            [
                one.__class__(**{**_fields(one), "status": "working",
                                 "status_source": "hook",
                                 "status_updated_at": NOW + 9, "summary": None}),
                two.__class__(**{**_fields(two), "groups": ("a", "b"),
                                 "display_name": "later",
                                 "last_active_at": NOW + 3}),
            ],
        )

    @defer.inlineCallbacks
    def test_update_sessions_unknown_column(self):
        """Updating a column that may not change fails with ValueError."""
        mesh, owner = yield self.makeMesh()
        session = self.makeSession(mesh, owner)
        yield self.store.open_sessions([session])
        yield self.assertFailure(
            self.store.update_sessions([(session.presence_id, {"mesh_id": "x"})]),
            ValueError,
        )

    @defer.inlineCallbacks
    def test_close_sessions_releases_leases(self):
        """Closing a session hides it and puts the deliveries it leased back in the queue."""
        mesh, owner, bob = yield self.meshWithRecipient()
        one = self.makeSession(mesh, bob)
        two = self.makeSession(mesh, bob, connected_at=NOW + 1)
        yield self.store.open_sessions([one, two])
        message = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([message])
        self.assertEqual(len((yield self.claim(bob, one.presence_id))), 1)
        closed = yield self.store.close_sessions([one.presence_id], NOW + 2)
        self.assertEqual(closed, 1)
        self.assertEqual((yield self.store.list_open_sessions(mesh.id)), [two])
        claimed = yield self.claim(bob, two.presence_id)
        self.assertEqual([(c.message_id, c.attempts) for c in claimed], [(message.id, 2)])
        self.assertEqual(
            (yield self.store.close_sessions([one.presence_id], NOW + 3)), 0
        )

    @defer.inlineCallbacks
    def test_close_all_sessions(self):
        """At start-up every open session is closed and every lease released."""
        mesh, owner, bob = yield self.meshWithRecipient()
        sessions = [self.makeSession(mesh, bob) for _ in range(3)]
        yield self.store.open_sessions(sessions)
        yield self.store.close_sessions([sessions[0].presence_id], NOW)
        yield self.store.enqueue([self.makeMessage(mesh, owner, [NewDelivery(bob.id)])])
        self.assertEqual(len((yield self.claim(bob, sessions[1].presence_id))), 1)
        self.assertEqual((yield self.store.close_all_sessions(NOW + 1)), 2)
        self.assertEqual((yield self.store.list_open_sessions(mesh.id)), [])
        self.assertEqual(len((yield self.claim(bob, "new-presence"))), 1)

    # -- enqueue ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_enqueue(self):
        """A batch is stored with its deliveries; seq grows across batches."""
        mesh, owner, bob = yield self.meshWithRecipient()
        batch = [
            self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1"),
            self.makeMessage(
                mesh, owner, [NewDelivery(bob.id, session_pubkey="spk"),
                              NewDelivery(owner.id, group_name="ops")],
                priority="now",
            ),
            self.makeMessage(mesh, bob, [NewDelivery(owner.id)]),
        ]
        results = yield self.store.enqueue(batch)
        self.assertEqual([r.message_id for r in results], [m.id for m in batch])
        self.assertEqual([r.duplicate for r in results], [False] * 3)
        seqs = [r.seq for r in results]
        self.assertEqual(seqs, sorted(set(seqs)))
        later = yield self.store.enqueue([self.makeMessage(mesh, owner, [])])
        self.assertGreater(later[0].seq, seqs[-1])

        stored = yield self.store.get_message(batch[1].id)
        self.assertEqual(stored, NewMessage(**{**_fields(batch[1]), "deliveries": ()}))
        self.assertIsNone((yield self.store.get_message("nope")))
        deliveries = yield self.store.message_deliveries(batch[1].id)
        self.assertEqual(
            [(d.recipient_key, d.recipient_kind, d.member_id, d.state, d.attempts,
              d.expires_at, d.acked_at, d.lease_session) for d in deliveries],
            [
                (owner.id, "member", owner.id, "queued", 0, NOW + HOUR, None, None),
                ("spk", "session", bob.id, "queued", 0, NOW + HOUR, None, None),
            ],
        )
        self.assertEqual((yield self.store.count_queued()), 4)

    @defer.inlineCallbacks
    def test_enqueue_repeated_recipient(self):
        """A recipient listed twice in one message gets one delivery."""
        mesh, owner, bob = yield self.meshWithRecipient()
        message = self.makeMessage(mesh, owner, [NewDelivery(bob.id), NewDelivery(bob.id)])
        yield self.store.enqueue([message])
        self.assertEqual(len((yield self.store.message_deliveries(message.id))), 1)

    @defer.inlineCallbacks
    def test_enqueue_duplicate_across_batches(self):
        """A retry with a known send key returns the original id and seq and stores nothing."""
        mesh, owner, bob = yield self.meshWithRecipient()
        first = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1")
        [original] = yield self.store.enqueue([first])
        retry = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id)], client_id="c1", created_at=NOW + 5
        )
        [result] = yield self.store.enqueue([retry])
        self.assertEqual((result.message_id, result.seq, result.duplicate),
                         (first.id, original.seq, True))
        self.assertIsNone((yield self.store.get_message(retry.id)))
        self.assertEqual((yield self.store.count_queued()), 1)

    @defer.inlineCallbacks
    def test_enqueue_duplicate_same_message_id(self):
        """A retry carrying the original message id is a duplicate, not a key clash."""
        mesh, owner, bob = yield self.meshWithRecipient()
        first = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1")
        [original] = yield self.store.enqueue([first])
        [result] = yield self.store.enqueue([first])
        self.assertEqual(result, original.__class__(first.id, original.seq, True))

    @defer.inlineCallbacks
    def test_enqueue_duplicate_in_batch(self):
        """The second message of a batch with the same send key duplicates the first."""
        mesh, owner, bob = yield self.meshWithRecipient()
        one = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1")
        other = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c2")
        two = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1")
        results = yield self.store.enqueue([one, other, two])
        self.assertEqual([r.duplicate for r in results], [False, False, True])
        self.assertEqual((results[2].message_id, results[2].seq),
                         (one.id, results[0].seq))
        self.assertIsNone((yield self.store.get_message(two.id)))
        self.assertEqual((yield self.store.count_queued()), 2)

    @defer.inlineCallbacks
    def test_enqueue_expired_send_key(self):
        """A send key past its expiry no longer makes a duplicate, and is replaced."""
        mesh, owner, bob = yield self.meshWithRecipient()
        first = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id)], client_id="c1", expires_at=NOW + 10
        )
        yield self.store.enqueue([first])
        late = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id)], client_id="c1", created_at=NOW + 10
        )
        [result] = yield self.store.enqueue([late])
        self.assertEqual((result.message_id, result.duplicate), (late.id, False))
        again = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id)], client_id="c1", created_at=NOW + 11
        )
        [result] = yield self.store.enqueue([again])
        self.assertEqual((result.message_id, result.duplicate), (late.id, True))

    @defer.inlineCallbacks
    def test_enqueue_send_key_per_sender(self):
        """The same client id from two senders makes two messages."""
        mesh, owner, bob = yield self.meshWithRecipient()
        results = yield self.store.enqueue(
            [
                self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1"),
                self.makeMessage(mesh, bob, [NewDelivery(owner.id)], client_id="c1"),
            ]
        )
        self.assertEqual([r.duplicate for r in results], [False, False])

    @defer.inlineCallbacks
    def test_enqueue_atomic(self):
        """A batch with a clashing message id stores nothing at all."""
        mesh, owner, bob = yield self.meshWithRecipient()
        existing = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([existing])
        fresh = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c9")
        clash = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], id=existing.id)
        event = AuditEvent(mesh.id, "message.sent", owner.id, {"n": 1}, NOW)
        yield self.assertFailure(
            self.store.enqueue([fresh, clash], [event]), DuplicateKey
        )
        self.assertIsNone((yield self.store.get_message(fresh.id)))
        self.assertEqual((yield self.store.count_queued()), 1)
        self.assertEqual((yield self.store.audit_entries(mesh.id, 10, 0))[1], 0)
        [retry] = yield self.store.enqueue([fresh])
        self.assertFalse(retry.duplicate)

    @defer.inlineCallbacks
    def test_enqueue_with_audit(self):
        """Audit events given to enqueue are chained in the same call."""
        mesh, owner, bob = yield self.meshWithRecipient()
        events = [AuditEvent(mesh.id, "message.sent", owner.id, {"i": i}, NOW + i)
                  for i in range(2)]
        yield self.store.enqueue([self.makeMessage(mesh, owner, [NewDelivery(bob.id)])],
                                 events)
        entries, total = yield self.store.audit_entries(mesh.id, 10, 0)
        self.assertEqual(total, 2)
        self.assertEqual([e.payload for e in entries], [{"i": 1}, {"i": 0}])
        self.assertTrue((yield self.store.verify_chain(mesh.id)).valid)

    @defer.inlineCallbacks
    def test_write_batch(self):
        """One write_batch opens, stores, updates, acknowledges, releases and closes."""
        mesh, owner, bob = yield self.meshWithRecipient()
        one = self.makeSession(mesh, bob)
        two = self.makeSession(mesh, bob)
        yield self.store.open_sessions([one])
        old = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        leased = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([old, leased])
        yield self.claim(bob, one.presence_id)
        fresh = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="w1")
        event = AuditEvent(mesh.id, "message_sent", owner.id, {"n": 1}, NOW)
        results = yield self.store.write_batch(WriteBatch(
            opens=(two,), messages=(fresh,), audit=(event,),
            updates=((two.presence_id, {"status": "working", "status_source": "manual",
                                        "status_updated_at": NOW + 5}),),
            acks=((old.id, bob.id, bob.id),), releases=(one.presence_id,),
            closes=((one.presence_id, NOW + 6),), now=NOW + 7))
        self.assertEqual([r.message_id for r in results.enqueued], [fresh.id])
        [session] = yield self.store.list_open_sessions(mesh.id)
        self.assertEqual((session.presence_id, session.status), (two.presence_id, "working"))
        [delivered] = yield self.store.message_deliveries(old.id)
        self.assertEqual((delivered.state, delivered.acked_at), ("delivered", NOW + 7))
        claimed = yield self.claim(bob, two.presence_id)
        self.assertEqual(sorted(c.message_id for c in claimed), sorted([leased.id, fresh.id]))
        self.assertEqual((yield self.store.audit_entries(mesh.id, 10, 0))[1], 1)

    @defer.inlineCallbacks
    def test_write_batch_claims_last(self):
        """A batch's claims run after its writes: they see its messages and its releases."""
        mesh, owner, bob = yield self.meshWithRecipient()
        old = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([old])
        yield self.claim(bob, "p-old")
        fresh = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        request = ClaimRequest(bob.id, None, "p-new", (), ALL, NOW, LEASE, 10)
        outcome = yield self.store.write_batch(WriteBatch(
            messages=(fresh,), releases=("p-old",), claims=(request, request), now=NOW))
        [first, second] = outcome.claimed
        self.assertEqual(sorted(c.message_id for c in first), sorted([old.id, fresh.id]))
        # The second claim of the batch sees the first one's leases.
        self.assertEqual(second, [])

    @defer.inlineCallbacks
    def test_write_batch_stores_leased(self):
        """A delivery carrying a lease is stored leased to that session."""
        mesh, owner, bob = yield self.meshWithRecipient()
        message = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id, lease_session="p1", lease_until=NOW + 30_000)])
        yield self.store.write_batch(WriteBatch(messages=(message,)))
        [row] = yield self.store.message_deliveries(message.id)
        self.assertEqual((row.state, row.lease_session, row.attempts), ("leased", "p1", 1))
        self.assertEqual((yield self.claim(bob, "p2")), [])

    # -- claims -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_claim_order(self):
        """Claims lease deliveries in seq order, with what the push needs."""
        mesh, owner, bob = yield self.meshWithRecipient()
        messages = [self.makeMessage(mesh, owner, [NewDelivery(bob.id)]) for _ in range(3)]
        results = yield self.store.enqueue(messages)
        first = yield self.claim(bob, limit=2)
        self.assertEqual([c.message_id for c in first], [m.id for m in messages[:2]])
        claimed = first[0]
        self.assertEqual(
            (claimed.recipient_key, claimed.recipient_kind, claimed.mesh_id,
             claimed.member_id, claimed.sender_pubkey, claimed.sender_member_pubkey,
             claimed.target_spec, claimed.priority, claimed.nonce, claimed.ciphertext,
             claimed.created_at, claimed.seq, claimed.attempts),
            (bob.id, "member", mesh.id, bob.id, owner.pubkey, owner.pubkey,
             "@everyone", "next", messages[0].nonce, messages[0].ciphertext, NOW,
             results[0].seq, 1),
        )
        rest = yield self.claim(bob)
        self.assertEqual([c.message_id for c in rest], [messages[2].id])
        deliveries = yield self.store.message_deliveries(messages[0].id)
        self.assertEqual(
            (deliveries[0].state, deliveries[0].lease_session, deliveries[0].lease_until),
            ("leased", "p1", NOW + LEASE),
        )

    @defer.inlineCallbacks
    def test_claim_priorities(self):
        """Only deliveries of the asked priorities are claimed."""
        mesh, owner, bob = yield self.meshWithRecipient()
        urgent = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], priority="now")
        later = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], priority="low")
        yield self.store.enqueue([urgent, later])
        self.assertEqual([c.message_id for c in (yield self.claim(bob, priorities=["now"]))],
                         [urgent.id])
        self.assertEqual((yield self.claim(bob, priorities=[])), [])
        self.assertEqual([c.message_id for c in (yield self.claim(bob))], [later.id])

    @defer.inlineCallbacks
    def test_claim_groups(self):
        """A group delivery goes only to a session in that group."""
        mesh, owner, bob = yield self.meshWithRecipient()
        ops = self.makeMessage(mesh, owner, [NewDelivery(bob.id, group_name="ops")])
        direct = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([ops, direct])
        self.assertEqual([c.message_id for c in (yield self.claim(bob, "p1", groups=["dev"]))],
                         [direct.id])
        self.assertEqual([c.message_id for c in (yield self.claim(bob, "p2"))], [])
        claimed = yield self.claim(bob, "p3", groups=["dev", "ops"])
        self.assertEqual([c.message_id for c in claimed], [ops.id])

    @defer.inlineCallbacks
    def test_claim_session_delivery_by_key(self):
        """The session with the delivery's key claims it, as a session delivery."""
        mesh, owner, bob = yield self.meshWithRecipient()
        message = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id, session_pubkey="spk-1")]
        )
        yield self.store.enqueue([message])
        self.assertEqual((yield self.claim(bob, "p1")), [])
        self.assertEqual((yield self.claim(bob, "p2", session_pubkey="spk-2")), [])
        claimed = yield self.claim(bob, "p3", session_pubkey="spk-1")
        self.assertEqual(
            [(c.message_id, c.recipient_key, c.recipient_kind) for c in claimed],
            [(message.id, "spk-1", "session")],
        )

    @defer.inlineCallbacks
    def test_claim_session_deliveries_only(self):
        """Without member deliveries only the session's own deliveries are claimed (watchers)."""
        mesh, owner, bob = yield self.meshWithRecipient()
        to_member = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        to_session = self.makeMessage(mesh, owner, [NewDelivery(bob.id, session_pubkey="spk-1")])
        yield self.store.enqueue([to_member, to_session])
        claimed = yield self.store.claim_deliveries(ClaimRequest(
            bob.id, "spk-1", "p-watch", (), ALL, NOW, LEASE, 10, member_deliveries=False))
        self.assertEqual([c.message_id for c in claimed], [to_session.id])
        self.assertEqual([c.message_id for c in (yield self.claim(bob, "p2"))], [to_member.id])

    @defer.inlineCallbacks
    def test_claim_scoped_by_member(self):
        """Another member naming the same session key claims none of its deliveries."""
        mesh, owner, bob = yield self.meshWithRecipient()
        carol = yield self.addMember(mesh)
        other_mesh, other_owner = yield self.makeMesh()
        stranger = yield self.addMember(other_mesh)
        message = self.makeMessage(mesh, owner, [NewDelivery(bob.id, session_pubkey="spk")])
        yield self.store.enqueue([message])
        self.assertEqual((yield self.claim(carol, "p-carol", session_pubkey="spk")), [])
        self.assertEqual((yield self.claim(stranger, "p-stranger", session_pubkey="spk")), [])
        [claimed] = yield self.claim(bob, "p-bob", session_pubkey="spk")
        self.assertEqual(claimed.message_id, message.id)

    @defer.inlineCallbacks
    def test_ack_scoped_by_member(self):
        """An acknowledgement by another member confirms nothing."""
        mesh, owner, bob = yield self.meshWithRecipient()
        carol = yield self.addMember(mesh)
        message = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id), NewDelivery(bob.id, session_pubkey="spk")])
        yield self.store.enqueue([message])
        foreign = [(message.id, carol.id, bob.id), (message.id, carol.id, "spk")]
        self.assertEqual((yield self.store.ack_deliveries(foreign, NOW)), 0)
        self.assertEqual((yield self.store.count_queued()), 2)

    @defer.inlineCallbacks
    def test_bind_session_key(self):
        """The first binding of a session key wins; another member's attempt reads it back."""
        mesh, owner, bob = yield self.meshWithRecipient()
        other, _ = yield self.makeMesh()
        mallory = yield self.addMember(other, display_name="mallory")
        first = SessionKeyBinding("spk", mesh.id, bob.id, NOW)
        self.assertEqual((yield self.store.bind_session_key(first)), first)
        self.assertEqual(
            (yield self.store.bind_session_key(SessionKeyBinding("spk", other.id, mallory.id,
                                                                 NOW + 1))), first)
        self.assertEqual(
            (yield self.store.bind_session_key(SessionKeyBinding("spk", mesh.id, bob.id,
                                                                 NOW + 2))), first)

    @defer.inlineCallbacks
    def test_bind_session_key_concurrently(self):
        """Of concurrent binders of one key exactly one wins, and all see the same winner."""
        mesh, owner, bob = yield self.meshWithRecipient()
        members = []
        for _ in range(6):
            members.append((yield self.addMember(mesh)))
        answers = yield defer.gatherResults([
            self.store.bind_session_key(SessionKeyBinding("spk", mesh.id, m.id, NOW))
            for m in members], consumeErrors=True)
        self.assertEqual(len(set(answers)), 1)
        self.assertIn(answers[0].member_id, [m.id for m in members])

    @defer.inlineCallbacks
    def test_remove_member_unbinds_its_keys(self):
        """A member that leaves frees its session keys (its rejoined key may bind them again)."""
        mesh, owner, bob = yield self.meshWithRecipient()
        yield self.store.bind_session_key(SessionKeyBinding("spk", mesh.id, bob.id, NOW))
        yield self.store.remove_member(bob.id)
        carol = yield self.addMember(mesh, display_name="carol")
        again = SessionKeyBinding("spk", mesh.id, carol.id, NOW + 1)
        self.assertEqual((yield self.store.bind_session_key(again)), again)

    @defer.inlineCallbacks
    def test_claim_skips_expired(self):
        """A delivery whose message expired cannot be claimed."""
        mesh, owner, bob = yield self.meshWithRecipient()
        message = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], expires_at=NOW + 5)
        yield self.store.enqueue([message])
        self.assertEqual((yield self.claim(bob, now=NOW + 5)), [])
        self.assertEqual(len((yield self.claim(bob, now=NOW + 4))), 1)

    @defer.inlineCallbacks
    def test_lease(self):
        """A leased delivery is not claimed again until its lease ends, then counts attempt 2."""
        mesh, owner, bob = yield self.meshWithRecipient()
        message = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([message])
        self.assertEqual(len((yield self.claim(bob, "p1"))), 1)
        self.assertEqual((yield self.claim(bob, "p2", now=NOW + LEASE - 1)), [])
        again = yield self.claim(bob, "p2", now=NOW + LEASE)
        self.assertEqual([(c.message_id, c.attempts) for c in again], [(message.id, 2)])
        deliveries = yield self.store.message_deliveries(message.id)
        self.assertEqual(
            (deliveries[0].lease_session, deliveries[0].lease_until),
            ("p2", NOW + 2 * LEASE),
        )

    @defer.inlineCallbacks
    def test_concurrent_claims_disjoint(self):
        """Concurrent claims by sessions of one member lease disjoint deliveries."""
        mesh, owner, bob = yield self.meshWithRecipient()
        messages = [self.makeMessage(mesh, owner, [NewDelivery(bob.id)]) for _ in range(20)]
        yield self.store.enqueue(messages)
        claims = yield defer.gatherResults(
            [self.claim(bob, "p%d" % (i,), limit=3) for i in range(8)],
            consumeErrors=True,
        )
        ids = [c.message_id for claim in claims for c in claim]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(len(ids), 20)

    @defer.inlineCallbacks
    def test_release_leases(self):
        """Released leases go back to the queue at once."""
        mesh, owner, bob = yield self.meshWithRecipient()
        yield self.store.enqueue(
            [self.makeMessage(mesh, owner, [NewDelivery(bob.id)]) for _ in range(2)]
        )
        yield self.claim(bob, "p1")
        self.assertEqual((yield self.store.release_leases(["p1", "other"])), 2)
        self.assertEqual((yield self.store.release_leases(["p1"])), 0)
        self.assertEqual([c.attempts for c in (yield self.claim(bob, "p2"))], [2, 2])

    @defer.inlineCallbacks
    def test_ack(self):
        """Acks confirm queued or leased deliveries; repeated or unknown acks count 0."""
        mesh, owner, bob = yield self.meshWithRecipient()
        leased = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        queued = self.makeMessage(mesh, owner, [NewDelivery(bob.id, session_pubkey="s")])
        yield self.store.enqueue([leased, queued])
        yield self.claim(bob, "p1")
        acks = [(leased.id, bob.id, bob.id), (queued.id, bob.id, "s"), ("nope", bob.id, bob.id),
                (leased.id, bob.id, "x")]
        self.assertEqual((yield self.store.ack_deliveries(acks, NOW + 1)), 2)
        self.assertEqual((yield self.store.ack_deliveries(acks, NOW + 2)), 0)
        self.assertEqual((yield self.store.ack_deliveries([], NOW + 2)), 0)
        [delivery] = yield self.store.message_deliveries(leased.id)
        self.assertEqual(
            (delivery.state, delivery.acked_at, delivery.lease_until),
            ("delivered", NOW + 1, None),
        )
        self.assertEqual((yield self.claim(bob, "p2", session_pubkey="s", now=NOW + LEASE)), [])
        self.assertEqual((yield self.store.count_queued()), 0)

    @defer.inlineCallbacks
    def test_expire_deliveries(self):
        """Pending deliveries past their expiry become expired; confirmed ones stay."""
        mesh, owner, bob = yield self.meshWithRecipient()
        carol = yield self.addMember(mesh)
        short = self.makeMessage(
            mesh, owner, [NewDelivery(bob.id), NewDelivery(carol.id)], expires_at=NOW + 10
        )
        long = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        yield self.store.enqueue([short, long])
        yield self.claim(bob, "p1", limit=1)
        yield self.store.ack_deliveries([(short.id, bob.id, bob.id)], NOW + 1)
        self.assertEqual((yield self.store.expire_deliveries(NOW + 9)), 0)
        self.assertEqual((yield self.store.expire_deliveries(NOW + 10)), 1)
        states = {d.recipient_key: d.state
                  for d in (yield self.store.message_deliveries(short.id))}
        self.assertEqual(states, {bob.id: "delivered", carol.id: "expired"})
        late = [(short.id, carol.id, carol.id)]
        self.assertEqual((yield self.store.ack_deliveries(late, NOW)), 0)
        self.assertEqual((yield self.store.count_queued()), 1)

    @defer.inlineCallbacks
    def test_delete_messages_before(self):
        """Old messages are deleted with their deliveries unless a delivery is pending."""
        mesh, owner, bob = yield self.meshWithRecipient()
        done = self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1",
                                expires_at=NOW + 10)
        pending = self.makeMessage(mesh, owner, [NewDelivery(bob.id)])
        recent = self.makeMessage(mesh, owner, [], created_at=NOW + 100)
        yield self.store.enqueue([done, pending, recent])
        yield self.store.ack_deliveries([(done.id, bob.id, bob.id)], NOW + 1)
        self.assertEqual((yield self.store.delete_messages_before(NOW + 50)), 1)
        self.assertIsNone((yield self.store.get_message(done.id)))
        self.assertEqual((yield self.store.message_deliveries(done.id)), [])
        self.assertIsNotNone((yield self.store.get_message(pending.id)))
        self.assertIsNotNone((yield self.store.get_message(recent.id)))
        # The send key expired before the cutoff: the client id is free again.
        self.assertEqual((yield self.store.delete_send_keys_before(NOW + 50)), 1)
        retry = self.makeMessage(mesh, owner, [], client_id="c1", created_at=NOW + 5)
        [result] = yield self.store.enqueue([retry])
        self.assertFalse(result.duplicate)

    @defer.inlineCallbacks
    def test_retention_in_batches(self):
        """
        With a limit, expiry, message deletion and send-key deletion each touch
        at most that many rows per call, oldest first, until none is left.
        """
        mesh, owner, bob = yield self.meshWithRecipient()
        messages = [
            self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c%d" % i,
                             created_at=NOW + i, expires_at=NOW + 10 + i)
            for i in range(5)
        ]
        yield self.store.enqueue(messages)
        counts = []
        for _ in range(4):
            counts.append((yield self.store.expire_deliveries(NOW + 100, 2)))
        self.assertEqual(counts, [2, 2, 1, 0])
        self.assertEqual((yield self.store.count_queued()), 0)
        self.assertEqual((yield self.store.delete_messages_before(NOW + 100, 3)), 3)
        # The oldest went first.
        self.assertIsNone((yield self.store.get_message(messages[2].id)))
        self.assertIsNotNone((yield self.store.get_message(messages[3].id)))
        self.assertEqual((yield self.store.delete_messages_before(NOW + 100, 3)), 2)
        self.assertEqual((yield self.store.message_deliveries(messages[4].id)), [])
        self.assertEqual((yield self.store.delete_messages_before(NOW + 100, 3)), 0)
        counts = []
        for _ in range(4):
            counts.append((yield self.store.delete_send_keys_before(NOW + 100, 2)))
        self.assertEqual(counts, [2, 2, 1, 0])

    @defer.inlineCallbacks
    def test_count_queued(self):
        """Queued and leased deliveries are counted, confirmed ones are not."""
        mesh, owner, bob = yield self.meshWithRecipient()
        self.assertEqual((yield self.store.count_queued()), 0)
        messages = [self.makeMessage(mesh, owner, [NewDelivery(bob.id)]) for _ in range(3)]
        yield self.store.enqueue(messages)
        yield self.claim(bob, limit=1)
        yield self.store.ack_deliveries([(messages[2].id, bob.id, bob.id)], NOW)
        self.assertEqual((yield self.store.count_queued()), 2)

    # -- audit ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_append_audit_chains(self):
        """Each mesh's audit rows chain from 'genesis', one sha256 link per row."""
        mesh, owner = yield self.makeMesh()
        other, _ = yield self.makeMesh()
        events = [
            AuditEvent(mesh.id, "member.joined", owner.id, {"b": 1.0, "a": [2, 1]}, NOW),
            AuditEvent(other.id, "mesh.created", None, {}, NOW + 1),
            AuditEvent(mesh.id, "member.left", None, {"x": "é"}, NOW + 2),
        ]
        entries = yield self.store.append_audit(events)
        self.assertEqual([(e.mesh_id, e.seq) for e in entries],
                         [(mesh.id, 1), (other.id, 1), (mesh.id, 2)])
        self.assertEqual(entries[0].payload, {"a": [2, 1], "b": 1})
        self.assertEqual(entries[0].prev_hash, GENESIS)
        self.assertEqual(entries[1].prev_hash, GENESIS)
        self.assertEqual(entries[2].prev_hash, entries[0].hash)
        self.assertEqual(
            entries[2].hash,
            chain_hash(entries[0].hash, mesh.id, "member.left", None, {"x": "é"}, NOW + 2),
        )
        [more] = yield self.store.append_audit(
            [AuditEvent(mesh.id, "member.banned", owner.id, {}, NOW + 3)]
        )
        self.assertEqual((more.seq, more.prev_hash), (3, entries[2].hash))
        stored, total = yield self.store.audit_entries(mesh.id, 10, 0)
        self.assertEqual(stored, [more, entries[2], entries[0]])

    @defer.inlineCallbacks
    def test_verify_chain(self):
        """An untouched chain verifies; an empty one too."""
        mesh, owner = yield self.makeMesh()
        result = yield self.store.verify_chain(mesh.id)
        self.assertEqual((result.valid, result.entries, result.broken_at), (True, 0, None))
        yield self.store.append_audit(
            [AuditEvent(mesh.id, "e", None, {"i": i}, NOW + i) for i in range(5)]
        )
        result = yield self.store.verify_chain(mesh.id)
        self.assertEqual((result.valid, result.entries, result.broken_at), (True, 5, None))

    @defer.inlineCallbacks
    def test_verify_chain_detects_tampering(self):
        """Changing a stored payload breaks the chain at that row."""
        mesh, owner = yield self.makeMesh()
        yield self.store.append_audit(
            [AuditEvent(mesh.id, "e", None, {"i": i}, NOW + i) for i in range(3)]
        )
        yield self._tamper_audit(mesh.id, 2)
        result = yield self.store.verify_chain(mesh.id)
        self.assertEqual((result.valid, result.entries, result.broken_at), (False, 3, 2))

    @defer.inlineCallbacks
    def test_audit_entries(self):
        """Audit entries come newest first, paged, with a total, optionally of one type."""
        mesh, owner = yield self.makeMesh()
        yield self.store.append_audit(
            [AuditEvent(mesh.id, "even" if i % 2 == 0 else "odd", owner.id, {"i": i},
                        NOW + i) for i in range(5)]
        )
        entries, total = yield self.store.audit_entries(mesh.id, 2, 1)
        self.assertEqual(([e.seq for e in entries], total), ([4, 3], 5))
        entries, total = yield self.store.audit_entries(mesh.id, 10, 0, event_type="even")
        self.assertEqual(([e.seq for e in entries], total), ([5, 3, 1], 3))
        self.assertEqual((yield self.store.audit_entries("nope", 10, 0)), ([], 0))

    # -- schema and persistence --------------------------------------------------

    @defer.inlineCallbacks
    def test_schema_version(self):
        """The store records the current schema version."""
        self.assertEqual((yield self._schema_version()), CURRENT_VERSION)

    @defer.inlineCallbacks
    def test_reopen_keeps_data(self):
        """Closing and reopening the same database keeps the data and keeps seq growing."""
        mesh, owner, bob = yield self.meshWithRecipient()
        [first] = yield self.store.enqueue(
            [self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c1")]
        )
        yield self.store.append_audit([AuditEvent(mesh.id, "e", None, {}, NOW)])
        yield self.store.close()
        self.store = yield self.openStore(self.reopenStore())
        self.assertEqual((yield self.store.get_mesh(mesh.id)), mesh)
        [retry] = yield self.store.enqueue(
            [self.makeMessage(mesh, owner, [], client_id="c1", created_at=NOW + 1)]
        )
        self.assertTrue(retry.duplicate)
        [second] = yield self.store.enqueue([self.makeMessage(mesh, owner, [])])
        self.assertGreater(second.seq, first.seq)
        [entry] = yield self.store.append_audit([AuditEvent(mesh.id, "e", None, {}, NOW)])
        self.assertEqual(entry.seq, 2)

    @defer.inlineCallbacks
    def test_schema_too_new(self):
        """A database written by a newer claudemesh is refused with SchemaTooNew."""
        yield self._set_schema_version(999)
        yield self.store.close()
        yield self.assertFailure(self.reopenStore().open(), SchemaTooNew)


def _fields(record):
    return {name: getattr(record, name) for name in record.__slots__
            if not name.startswith("__")}


class SQLiteStoreTests(StoreTestsMixin, TestCase):
    """
    The shared suite on L{SQLiteStore}, a new file per test.
    """

    def makeStore(self):
        self.path = os.path.join(self.mktemp() + ".d", "store.sqlite3")
        os.makedirs(os.path.dirname(self.path))
        return SQLiteStore(self.path, reactor)

    def reopenStore(self):
        return SQLiteStore(self.path, reactor)

    def _raw(self, sql, *params):
        return self.store._connection.run(
            lambda connection: connection.execute(sql, params).fetchall())

    def _tamper_audit(self, mesh_id, seq):
        return self._raw(
            "UPDATE audit_log SET payload = '{\"tampered\":true}'"
            " WHERE mesh_id = ? AND seq = ?",
            mesh_id,
            seq,
        )

    def _schema_version(self):
        return self._raw("SELECT version FROM schema_version").addCallback(
            lambda rows: rows[0][0] if len(rows) == 1 else rows
        )

    def _set_schema_version(self, version):
        return self._raw("UPDATE schema_version SET version = ?", version)

    @defer.inlineCallbacks
    def test_rows_inserted_in_chunks(self):
        """
        A batch larger than one multi-row INSERT is stored whole, in order,
        with its send keys' conflict clause applied across the chunks.
        """
        self.patch(sqlite_module, "INSERT_ROWS", 2)
        mesh, owner, bob = yield self.meshWithRecipient()
        messages = [self.makeMessage(mesh, owner, [NewDelivery(bob.id)], client_id="c%d" % i)
                    for i in range(5)]
        results = yield self.store.enqueue(messages)
        self.assertEqual([r.duplicate for r in results], [False] * 5)
        self.assertEqual([r.seq for r in results], sorted(r.seq for r in results))
        for message in messages:
            self.assertIsNotNone((yield self.store.get_message(message.id)))
            [delivery] = yield self.store.message_deliveries(message.id)
            self.assertEqual(delivery.member_id, bob.id)
        # An expired key is replaced through the ON CONFLICT clause.
        retries = [self.makeMessage(mesh, owner, [], client_id="c%d" % i,
                                    created_at=NOW + 2 * HOUR, expires_at=NOW + 3 * HOUR)
                   for i in range(5)]
        again = yield self.store.enqueue(retries)
        self.assertEqual([r.duplicate for r in again], [False] * 5)
        repeated = yield self.store.enqueue([self.makeMessage(
            mesh, owner, [], client_id="c3", created_at=NOW + 2 * HOUR + 1)])
        self.assertEqual((repeated[0].message_id, repeated[0].duplicate), (retries[3].id, True))

    @defer.inlineCallbacks
    def test_pragmas(self):
        """The connection runs in WAL mode with foreign keys and a busy timeout."""
        rows = yield self.store._connection.run(
            lambda c: [c.execute("PRAGMA %s" % (p,)).fetchone()[0]
                       for p in ("journal_mode", "foreign_keys", "busy_timeout",
                                 "synchronous", "cache_size")]
        )
        self.assertEqual(rows[:2], ["wal", 1])
        self.assertGreater(rows[2], 0)
        # NORMAL
        self.assertEqual(rows[3], 1)
        # A page cache of 64 MiB (negative: in KiB), not SQLite's 2 MiB.
        self.assertEqual(rows[4], -65536)

    @defer.inlineCallbacks
    def test_memory_database(self):
        """A :memory: database works for the life of the store."""
        store = yield self.openStore(SQLiteStore(":memory:", reactor))
        mesh = MeshRecord("m", "n", "s", "k", NOW)
        yield store.create_mesh(mesh, MemberRecord("o", "m", "k", "o", "owner", NOW))
        self.assertEqual((yield store.get_mesh("m")), mesh)


class InlineSQLiteStoreTests(SQLiteStoreTests):
    """
    The shared suite on L{SQLiteStore.inline}, the store of the broker
    core's unit tests: the same SQL, run at once in the calling thread.
    """

    def makeStore(self):
        self.path = os.path.join(self.mktemp() + ".d", "store.sqlite3")
        os.makedirs(os.path.dirname(self.path))
        return SQLiteStore.inline(self.path)

    def reopenStore(self):
        return SQLiteStore.inline(self.path)

    def test_fired_deferreds(self):
        """Every call returns an already-fired Deferred, with no reactor involved."""
        store = SQLiteStore.inline()
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        mesh = MeshRecord("m", "n", "s", "k", NOW)
        owner = MemberRecord("o", "m", "k", "o", "owner", NOW)
        self.successResultOf(store.create_mesh(mesh, owner))
        self.assertEqual(self.successResultOf(store.get_mesh("m")), mesh)
        self.failureResultOf(store.create_mesh(mesh, owner), DuplicateKey)

    def test_failed_transaction_rolls_back(self):
        """A transaction that fails half-way leaves nothing of itself behind."""
        store = SQLiteStore.inline()
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        mesh = MeshRecord("m", "n", "s", "k", NOW)
        owner = MemberRecord("o", "m", "k", "o", "owner", NOW)
        self.successResultOf(store.create_mesh(mesh, owner))
        # The second mesh's row goes in, then its owner's member id clashes.
        other = MeshRecord("m2", "n2", "s2", "k2", NOW)
        self.failureResultOf(
            store.create_mesh(other, MemberRecord("o", "m2", "k2", "o", "owner", NOW)),
            DuplicateKey)
        self.assertIsNone(self.successResultOf(store.get_mesh("m2")))


class PostgresStoreTests(StoreTestsMixin, TestCase):
    """
    The shared suite on L{PostgresStore}, a new schema per test.
    """

    skip = PG_SKIP

    def makeStore(self):
        self.schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, self.schema)
        return PostgresStore(PG_DSN, self.schema, reactor)

    def reopenStore(self):
        return PostgresStore(PG_DSN, self.schema, reactor)

    def _raw(self, sql, *params):
        return self.store._pool.runQuery(sql, params)

    def _tamper_audit(self, mesh_id, seq):
        return self.store._pool.runOperation(
            "UPDATE audit_log SET payload = '{\"tampered\":true}'"
            " WHERE mesh_id = %s AND seq = %s",
            (mesh_id, seq),
        )

    def _schema_version(self):
        return self._raw("SELECT version FROM schema_version").addCallback(
            lambda rows: rows[0][0] if len(rows) == 1 else rows
        )

    def _set_schema_version(self, version):
        return self.store._pool.runOperation(
            "UPDATE schema_version SET version = %s", (version,)
        )

    @defer.inlineCallbacks
    def test_tables_in_schema(self):
        """The tables live in the configured schema, not in public."""
        rows = yield self._raw(
            "SELECT table_schema FROM information_schema.tables"
            " WHERE table_name = 'deliveries' AND table_schema = %s",
            self.schema,
        )
        self.assertEqual(rows, [(self.schema,)])

    @defer.inlineCallbacks
    def test_concurrent_open(self):
        """Two stores opening a fresh schema at once create it exactly once."""
        schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, schema)
        stores = [PostgresStore(PG_DSN, schema, reactor, pool_size=1) for _ in range(3)]
        for store in stores:
            self.addCleanup(store.close)
        yield defer.gatherResults([store.open() for store in stores], consumeErrors=True)
        rows = yield stores[0]._pool.runQuery("SELECT version FROM schema_version")
        self.assertEqual(rows, [(CURRENT_VERSION,)])

    def test_bad_schema_name(self):
        """A schema name that is not a plain identifier is refused at once."""
        self.assertRaises(ValueError, PostgresStore, PG_DSN, 'x"; DROP', reactor)

    @defer.inlineCallbacks
    def test_unreachable(self):
        """An unreachable server fails open and ping fast with StoreUnavailable, password unsaid."""
        store = PostgresStore(
            "postgresql://postgres:sekrit@127.0.0.1:1/postgres", "claudemesh", reactor
        )
        self.addCleanup(store.close)
        started = time.monotonic()
        error = yield self.assertFailure(store.open(), StoreUnavailable)
        self.assertNotIn("sekrit", str(error))
        error = yield self.assertFailure(store.ping(), StoreUnavailable)
        self.assertNotIn("sekrit", str(error))
        self.assertLess(time.monotonic() - started, 5)

    @defer.inlineCallbacks
    def test_outage_heals(self):
        """After the server drops every connection, calls fail fast, then work again."""
        mesh, owner = yield self.makeMesh()
        killed = pg.terminate_other_backends(PG_DSN)
        self.assertGreater(killed, 0)
        failures = 0
        deadline = time.monotonic() + 20
        while True:
            try:
                found = yield defer.gatherResults(
                    [self.store.get_mesh(mesh.id) for _ in range(8)], consumeErrors=True
                )
            except defer.FirstError as e:
                e.subFailure.trap(StoreUnavailable)
                failures += 1
                self.assertLess(time.monotonic(), deadline, "the store did not recover")
                yield task.deferLater(reactor, 0.1, lambda: None)
                continue
            break
        self.assertGreater(failures, 0)
        self.assertEqual(found, [mesh] * 8)
        self.flushLoggedErrors()


class SchemaUpgradeTests(TestCase):
    """
    A database created by an older claudemesh is upgraded in place at open.
    """

    def indexes(self, connection_rows):
        return sorted(name for (name,) in connection_rows if name.startswith("deliveries_"))

    @defer.inlineCallbacks
    def test_sqlite_v1_to_current(self):
        """A version-1 SQLite file is upgraded: new indexes and tables, data kept, version set."""
        path = os.path.join(self.mktemp() + ".sqlite3")
        connection = sqlite3.connect(path)
        for statement in split_statements(full_schema(1)):
            connection.execute(statement)
        connection.execute("INSERT INTO schema_version (version) VALUES (1)")
        connection.execute("INSERT INTO meshes VALUES ('m1', 'Team', 'team', 'k', 1)")
        connection.commit()
        connection.close()
        store = SQLiteStore(path, reactor)
        yield store.open()
        self.addCleanup(store.close)
        self.assertEqual((yield store.get_mesh("m1")).name, "Team")
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("SELECT version FROM schema_version").fetchall(),
                         [(CURRENT_VERSION,)])
        names = self.indexes(connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'").fetchall())
        self.assertIn("deliveries_lease", names)
        self.assertNotIn("deliveries_expiry", names)
        binding = SessionKeyBinding("spk", "m1", "member", 1)
        self.assertEqual((yield store.bind_session_key(binding)), binding)

    @defer.inlineCallbacks
    def test_postgres_v1_to_current(self):
        """A version-1 Postgres schema is upgraded the same way."""
        if PG_SKIP:
            raise SkipTest(PG_SKIP)
        schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, schema)
        pg.run(PG_DSN, 'CREATE SCHEMA "%s"' % (schema,))
        script = "SET search_path TO \"%s\"; " % (schema,) + ";\n".join(
            split_statements(full_schema(1))) + "; INSERT INTO schema_version VALUES (1)"
        pg.run(PG_DSN, script)
        store = PostgresStore(PG_DSN, schema, reactor)
        yield store.open()
        self.addCleanup(store.close)
        rows = pg.run(PG_DSN, 'SELECT version FROM "%s".schema_version' % (schema,))
        self.assertEqual(rows, [(CURRENT_VERSION,)])
        names = self.indexes(pg.run(
            PG_DSN, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)))
        self.assertIn("deliveries_lease", names)
        self.assertNotIn("deliveries_expiry", names)
        binding = SessionKeyBinding("spk", "m1", "member", 1)
        self.assertEqual((yield store.bind_session_key(binding)), binding)


class SchemaFileTests(TestCase):
    """
    Tests for the schema files and L{split_statements}.
    """

    def test_split_statements(self):
        """Statements split on semicolons outside comments, strings and identifiers."""
        script = (
            "-- a comment; with a semicolon\n"
            "CREATE TABLE a (x TEXT DEFAULT 'it''s; fine'); /* block; */\n"
            'CREATE TABLE "b;c" (y INT) -- trailing; comment\n'
            ";;\nSELECT 1"
        )
        self.assertEqual(
            split_statements(script),
            [
                "CREATE TABLE a (x TEXT DEFAULT 'it''s; fine')",
                'CREATE TABLE "b;c" (y INT)',
                "SELECT 1",
            ],
        )

    def test_split_refuses_dollar_quotes(self):
        """Dollar quoting, which could hide semicolons, is refused rather than mis-split."""
        self.assertRaises(ValueError, split_statements, "SELECT $$a;b$$")

    def test_current_schema(self):
        """The current schema file exists and creates the version table."""
        statements = split_statements(full_schema(CURRENT_VERSION))
        self.assertTrue(statements[0].startswith("CREATE TABLE schema_version"))
        self.assertFalse(any("--" in s for s in statements))


class MakeStoreTests(TestCase):
    """
    Tests for L{make_store}, L{describe_store} and L{StoreService}.
    """

    def test_sqlite_default(self):
        """Without a database URL the store is a SQLite file in a new 0700 data directory."""
        data_dir = os.path.join(self.mktemp(), "data")
        store = make_store(None, data_dir, "claudemesh", reactor)
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.path, os.path.join(data_dir, "claudemesh.sqlite3"))
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)

    def test_postgres(self):
        """postgresql:// and postgres:// URLs make a Postgres store in the given schema."""
        for url in ("postgresql://u@h/db", "postgres://u:p@h/db"):
            store = make_store(url, "/nonexistent", "other", reactor)
            self.assertIsInstance(store, PostgresStore)
            self.assertEqual((store.dsn, store.schema), (url, "other"))

    def test_unsupported(self):
        """Any other URL is refused with a message that names what works, without a password."""
        error = self.assertRaises(
            ValueError, make_store, "mysql://u:sekrit@h/db", "/x", "s", reactor
        )
        self.assertIn("postgresql://", str(error))
        self.assertNotIn("sekrit", str(error))

    def test_describe(self):
        """Descriptions name the kind and location and never the password."""
        self.assertEqual(describe_store(None, "/var/lib/cm"),
                         "sqlite /var/lib/cm/claudemesh.sqlite3")
        description = describe_store(
            "postgresql://bob:sekrit@db:5432/mesh?sslmode=require&password=x", "/x"
        )
        self.assertEqual(description, "postgres postgresql://bob@db:5432/mesh?sslmode=require")

    def test_describe_hides_every_password(self):
        """
        The client key's passphrase (libpq's C{sslpassword}) is a password
        too: neither the URL nor the DSN description says it.
        """
        url = "postgresql://bob@db/mesh?sslpassword=sekrit1&password=sekrit2&sslmode=require"
        for description in (describe_store(url, "/x"), safe_dsn(url)):
            self.assertNotIn("sekrit", description)
            self.assertIn("sslmode", description)

    def test_service(self):
        """The service opens the store on start and closes it on stop."""
        store = SQLiteStore.inline()
        service = StoreService(store)
        waiting = service.whenOpen()
        self.successResultOf(service.startService())
        self.successResultOf(waiting)
        self.successResultOf(store.ping())
        self.successResultOf(service.stopService())
        self.failureResultOf(store.ping(), StoreUnavailable)

    def test_service_failure(self):
        """A store that cannot open fails whenOpen and logs why."""
        path = self.mktemp()
        first = SQLiteStore.inline(path)
        self.successResultOf(first.open())
        first._connection.run(
            lambda connection: connection.execute("UPDATE schema_version SET version = 999"))
        first.close()
        store = SQLiteStore.inline(path)
        service = StoreService(store)
        self.failureResultOf(service.startService(), SchemaTooNew)
        self.failureResultOf(service.whenOpen(), SchemaTooNew)
        self.assertEqual(len(self.flushLoggedErrors(SchemaTooNew)), 1)
