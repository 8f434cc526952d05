"""
Tests for L{claudemesh.store.sql.meshkeys} (issue 17): mesh key epochs and
their sealed copies, on every store (SQLite in its thread, SQLite inline,
Postgres), and the schema upgrade from version 3 on SQLite and Postgres.
"""

import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase

from claudemesh.store import PostgresStore, SQLiteStore
from claudemesh.store.records import AuditEvent, ClaimRequest, KeyRotation, NewDelivery
from claudemesh.store.schema import CURRENT_VERSION, full_schema, split_statements
from tests import pg
from tests.test_store import ALL, HOUR, LEASE, NOW, PG_DSN, PG_SKIP, StoreFixture

TABLES = ("meshes", "members", "invites", "messages", "deliveries", "audit_log",
          "mesh_key_epochs", "mesh_key_copies")


class MeshKeyStoreTestsMixin(StoreFixture):
    """
    The mesh key half of every L{IStore}; a concrete class provides
    C{makeStore()}.
    """

    @defer.inlineCallbacks
    def setUp(self):
        yield StoreFixture.setUp(self)
        self.mesh, self.owner = yield self.makeMesh()
        self.alice = yield self.addMember(self.mesh, display_name="alice")
        self.bob = yield self.addMember(self.mesh, display_name="bob")

    DUMPED_TABLES = TABLES

    def rotation(self, epoch=1, members=None, by=None, at=NOW):
        members = [self.owner, self.alice, self.bob] if members is None else members
        by = by or self.owner
        return KeyRotation(self.mesh.id, epoch, by.id, by.pubkey, "manual", at,
                           tuple(sorted((m.id, "sealed-%s-%d" % (m.id, epoch))
                                        for m in members)))

    def rotated(self, epoch=1):
        return AuditEvent(self.mesh.id, "mesh_key_rotated", self.owner.id,
                          {"epoch": epoch, "by": "owner", "reason": "manual"}, NOW)

    # -- rotation ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_epoch_zero_before_any_rotation(self):
        """A mesh starts at key epoch 0 (the invite links' key), with no copies."""
        self.assertEqual((yield self.store.current_key_epoch(self.mesh.id)), 0)
        self.assertIsNone((yield self.store.get_mesh_key_copy(self.mesh.id, 0, self.alice.id)))

    @defer.inlineCallbacks
    def test_rotation_commits_epoch_copies_and_audit(self):
        """A rotation covering every member stores the epoch, each copy and its audit entry."""
        outcome = yield self.store.rotate_mesh_key(self.rotation(), [self.rotated()])
        self.assertEqual((outcome.stored, outcome.current_epoch, outcome.shared), (True, 1, 3))
        self.assertEqual((yield self.store.current_key_epoch(self.mesh.id)), 1)
        copy = yield self.store.get_mesh_key_copy(self.mesh.id, 1, self.alice.id)
        self.assertEqual((copy.sealed_key, copy.sealed_by, copy.created_at),
                         ("sealed-%s-1" % (self.alice.id,), self.owner.pubkey, NOW))
        self.assertEqual((yield self.auditTypes(self.mesh))[-1], "mesh_key_rotated")

    @defer.inlineCallbacks
    def test_epoch_must_be_the_next(self):
        """Skipping an epoch, or committing one twice, stores nothing."""
        before = yield self.dump()
        outcome = yield self.store.rotate_mesh_key(self.rotation(epoch=2), [self.rotated(2)])
        self.assertEqual((outcome.stored, outcome.current_epoch), (False, 0))
        self.assertEqual((yield self.dump()), before)
        yield self.store.rotate_mesh_key(self.rotation(), [self.rotated()])
        before = yield self.dump()
        again = yield self.store.rotate_mesh_key(self.rotation(), [self.rotated()])
        self.assertEqual((again.stored, again.current_epoch, again.missing, again.unexpected),
                         (False, 1, (), ()))
        self.assertEqual((yield self.dump()), before)

    @defer.inlineCallbacks
    def test_copies_must_cover_exactly_the_members(self):
        """A member left out, or a banned one included, is reported and nothing is stored."""
        before = yield self.dump()
        outcome = yield self.store.rotate_mesh_key(
            self.rotation(members=[self.owner, self.alice]), [self.rotated()])
        self.assertEqual((outcome.stored, outcome.missing, outcome.unexpected),
                         (False, (self.bob.id,), ()))
        yield self.store.ban_member(self.bob.id, NOW)
        before = yield self.dump()
        outcome = yield self.store.rotate_mesh_key(self.rotation(), [self.rotated()])
        self.assertEqual((outcome.stored, outcome.missing, outcome.unexpected),
                         (False, (), (self.bob.id,)))
        self.assertEqual((yield self.dump()), before)
        outcome = yield self.store.rotate_mesh_key(
            self.rotation(members=[self.owner, self.alice]), [self.rotated()])
        self.assertTrue(outcome.stored)

    @defer.inlineCallbacks
    def test_rotation_all_or_nothing(self):
        """A rotation interrupted after any of its statements leaves epoch 0 and no copy."""
        yield self.assertAllOrNothing(
            lambda: self.store.rotate_mesh_key(self.rotation(), [self.rotated()]))
        self.assertEqual((yield self.store.current_key_epoch(self.mesh.id)), 1)

    @defer.inlineCallbacks
    def test_concurrent_rotations_commit_once(self):
        """Of several rotations to the same epoch at once, exactly one is stored."""
        outcomes = yield defer.gatherResults([
            self.store.rotate_mesh_key(self.rotation(by=by), [self.rotated()])
            for by in (self.owner, self.alice, self.bob, self.owner)], consumeErrors=True)
        self.assertEqual(sorted(o.stored for o in outcomes), [False, False, False, True])
        self.assertEqual((yield self.auditTypes(self.mesh)).count("mesh_key_rotated"), 1)

    @defer.inlineCallbacks
    def test_rotation_racing_a_ban_or_a_leave(self):
        """
        A rotation naming a member and that member's ban (or leave) at once:
        either the rotation is refused naming it, or it committed first and
        the departure is reported as since that rotation — never a committed
        epoch the departed member holds without anyone being told.
        """
        members, epoch = [self.owner, self.alice, self.bob], 0
        for round_ in range(6):
            victim = yield self.addMember(self.mesh, display_name="v%d" % (round_,))
            members.append(victim)

            def rotate():
                return self.store.rotate_mesh_key(
                    self.rotation(epoch + 1, members), [self.rotated(epoch + 1)])

            # Which starts first alternates (a single-threaded store runs them
            # in that order; Postgres in either).
            rotation = rotate() if (round_ // 2) % 2 else None
            if round_ % 2:
                departure = self.store.remove_member(victim.id, [AuditEvent(
                    self.mesh.id, "member_left", victim.id,
                    {"pubkey": victim.pubkey, "name": "v"}, NOW)])
            else:
                departure = self.store.ban_member(victim.id, NOW, [AuditEvent(
                    self.mesh.id, "member_banned", self.owner.id,
                    {"target": "v", "targetPubkey": victim.pubkey}, NOW)])
            rotation = rotation or rotate()
            outcome, _ = yield defer.gatherResults([rotation, departure], consumeErrors=True)
            members.remove(victim)
            report = yield self.store.mesh_key_report(self.mesh.id, 20)
            departed = [d.pubkey for d in report.departures]
            if outcome.stored:
                epoch += 1
                self.assertEqual(departed, [victim.pubkey])
            else:
                self.assertEqual((outcome.unexpected, outcome.current_epoch),
                                 ((victim.id,), epoch))
            # The next rotation, without the departed member, clears it.
            outcome = yield self.store.rotate_mesh_key(
                self.rotation(epoch + 1, members), [self.rotated(epoch + 1)])
            self.assertTrue(outcome.stored)
            epoch += 1
            report = yield self.store.mesh_key_report(self.mesh.id, 20)
            self.assertEqual(report.departures, ())

    # -- sharing -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_share_for_members_without_a_copy(self):
        """A share stores copies for members without one and keeps those already stored."""
        yield self.store.rotate_mesh_key(self.rotation(), [self.rotated()])
        # Joined after the rotation (with an invite made before it).
        carol = yield self.addMember(self.mesh, display_name="carol")
        outcome = yield self.store.share_mesh_key(
            self.mesh.id, 1, ((carol.id, "c1"), (self.alice.id, "replaced?")),
            self.alice.pubkey, NOW + 1)
        self.assertEqual((outcome.stored, outcome.shared), (True, 1))
        self.assertEqual(
            (yield self.store.get_mesh_key_copy(self.mesh.id, 1, carol.id)).sealed_by,
            self.alice.pubkey)
        self.assertEqual(
            (yield self.store.get_mesh_key_copy(self.mesh.id, 1, self.alice.id)).sealed_key,
            "sealed-%s-1" % (self.alice.id,))

    @defer.inlineCallbacks
    def test_share_refused(self):
        """A share for epoch 0, an old epoch or a banned member stores nothing."""
        carol = yield self.addMember(self.mesh, display_name="carol")
        outcome = yield self.store.share_mesh_key(self.mesh.id, 0, ((carol.id, "c"),),
                                                  "k", NOW)
        self.assertEqual((outcome.stored, outcome.current_epoch), (False, 0))
        everyone = [self.owner, self.alice, self.bob, carol]
        yield self.store.rotate_mesh_key(self.rotation(members=everyone), [self.rotated()])
        yield self.store.rotate_mesh_key(self.rotation(epoch=2, members=everyone),
                                         [self.rotated(2)])
        yield self.store.ban_member(self.bob.id, NOW)
        before = yield self.dump()
        outcome = yield self.store.share_mesh_key(self.mesh.id, 1, ((carol.id, "c"),), "k", NOW)
        self.assertEqual((outcome.stored, outcome.current_epoch), (False, 2))
        outcome = yield self.store.share_mesh_key(
            self.mesh.id, 2, ((carol.id, "c"), (self.bob.id, "b")), "k", NOW)
        self.assertEqual((outcome.stored, outcome.unexpected), (False, (self.bob.id,)))
        self.assertEqual((yield self.dump()), before)

    # -- what moderators are told ----------------------------------------------------

    @defer.inlineCallbacks
    def test_report_departures_since_the_last_rotation(self):
        """Bans and departures after the last rotation are reported, unbanned ones not."""
        def banned(member):
            return AuditEvent(self.mesh.id, "member_banned", self.owner.id, {
                "target": member.display_name, "targetPubkey": member.pubkey}, NOW + 5)

        yield self.store.ban_member(self.alice.id, NOW, [banned(self.alice)])
        report = yield self.store.mesh_key_report(self.mesh.id, 20)
        self.assertEqual([(d.event_type, d.name, d.pubkey) for d in report.departures],
                         [("member_banned", "alice", self.alice.pubkey)])
        self.assertEqual((report.epoch, report.without_copy), (0, ()))
        yield self.store.rotate_mesh_key(
            self.rotation(members=[self.owner, self.bob], at=NOW + 1), [self.rotated()])
        report = yield self.store.mesh_key_report(self.mesh.id, 20)
        self.assertEqual((report.epoch, report.departures), (1, ()))
        yield self.store.remove_member(self.bob.id, [AuditEvent(
            self.mesh.id, "member_left", self.bob.id, {"pubkey": self.bob.pubkey,
                                                      "name": "bob"}, NOW + 9)])
        carol = yield self.addMember(self.mesh, display_name="carol", joined_at=NOW + 10)
        dave = yield self.addMember(self.mesh, display_name="dave", joined_at=NOW + 11)
        yield self.store.unban_member(self.alice.id)
        report = yield self.store.mesh_key_report(self.mesh.id, 20)
        self.assertEqual([(d.event_type, d.name, d.at) for d in report.departures],
                         [("member_left", "bob", NOW + 9)])
        # alice was banned when epoch 1 was made: not one to share it with.
        self.assertEqual([m.id for m in report.without_copy], [carol.id, dave.id])
        self.assertEqual([m.id for m in report.shut_out], [self.alice.id])
        report = yield self.store.mesh_key_report(self.mesh.id, 1)
        self.assertEqual(len(report.without_copy), 1)

    @defer.inlineCallbacks
    def test_epoch_of_a_ban_never_shared_after_the_unban(self):
        """
        A member banned when an epoch was made and unbanned since is refused
        a shared copy of it (with anyone else in the same share: nothing
        stored); the next rotation includes it (review 2, N3).
        """
        yield self.store.ban_member(self.bob.id, NOW)
        yield self.store.rotate_mesh_key(
            self.rotation(members=[self.owner, self.alice], at=NOW + 1), [self.rotated()])
        yield self.store.unban_member(self.bob.id)
        carol = yield self.addMember(self.mesh, display_name="carol", joined_at=NOW + 2)
        self.assertEqual((yield self.store.key_epoch_made_at(self.mesh.id, 1)), NOW + 1)
        self.assertIsNone((yield self.store.key_epoch_made_at(self.mesh.id, 0)))
        before = yield self.dump()
        for copies in (((self.bob.id, "b"),), ((carol.id, "c"), (self.bob.id, "b"))):
            outcome = yield self.store.share_mesh_key(self.mesh.id, 1, copies, "k", NOW + 3)
            self.assertEqual((outcome.stored, outcome.shut_out, outcome.current_epoch),
                             (False, (self.bob.id,), 1))
        self.assertEqual((yield self.dump()), before)
        self.assertIsNone((yield self.store.get_mesh_key_copy(self.mesh.id, 1, self.bob.id)))
        outcome = yield self.store.share_mesh_key(self.mesh.id, 1, ((carol.id, "c"),), "k",
                                                  NOW + 3)
        self.assertEqual((outcome.stored, outcome.shared), (True, 1))
        everyone = [self.owner, self.alice, self.bob, carol]
        outcome = yield self.store.rotate_mesh_key(
            self.rotation(epoch=2, members=everyone, at=NOW + 4), [self.rotated(2)])
        self.assertTrue(outcome.stored)
        report = yield self.store.mesh_key_report(self.mesh.id, 20)
        self.assertEqual((report.epoch, report.without_copy, report.shut_out), (2, (), ()))

    # -- messages carry their epoch ---------------------------------------------------

    @defer.inlineCallbacks
    def test_message_keeps_its_key_epoch(self):
        """A message's key epoch is stored, read back and handed out with its claims."""
        message = self.makeMessage(self.mesh, self.owner, [NewDelivery(self.alice.id)],
                                   key_epoch=7)
        yield self.store.enqueue([message])
        self.assertEqual((yield self.store.get_message(message.id)).key_epoch, 7)
        [claimed] = yield self.store.claim_deliveries(ClaimRequest(
            self.alice.id, None, "p1", (), ALL, NOW, LEASE, 10))
        self.assertEqual((claimed.key_epoch, claimed.attempts), (7, 1))


class SQLiteMeshKeyStoreTests(MeshKeyStoreTestsMixin, TestCase):
    """
    On L{SQLiteStore} in adbapi's thread.
    """

    def makeStore(self):
        path = os.path.join(self.mktemp() + ".d", "store.sqlite3")
        os.makedirs(os.path.dirname(path))
        return SQLiteStore(path, reactor)


class InlineSQLiteMeshKeyStoreTests(MeshKeyStoreTestsMixin, TestCase):
    """
    On L{SQLiteStore.inline}, the store of the core's unit tests.
    """

    def makeStore(self):
        return SQLiteStore.inline()


class PostgresMeshKeyStoreTests(MeshKeyStoreTestsMixin, TestCase):
    """
    On L{PostgresStore}, a new schema per test.
    """

    skip = PG_SKIP

    def makeStore(self):
        schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, schema)
        return PostgresStore(PG_DSN, schema, reactor)


V3_ROWS = (
    "INSERT INTO meshes VALUES ('m1', 'Team', 'team', 'k', 1)",
    "INSERT INTO members (id, mesh_id, pubkey, display_name, role, joined_at)"
    " VALUES ('u1', 'm1', 'k', 'owner', 'owner', 1)",
    "INSERT INTO messages (id, mesh_id, sender_member_id, sender_pubkey,"
    " sender_member_pubkey, target_spec, priority, nonce, ciphertext, seq, created_at,"
    " expires_at) VALUES ('msg1', 'm1', 'u1', 'k', 'k', '*', 'next', 'n', 'c', 1, 1, %d)"
    % (NOW + HOUR,),
)


class SchemaV3UpgradeTests(TestCase):
    """
    A version-3 database is upgraded to the mesh key epochs in place: its
    messages are of epoch 0 and its meshes at epoch 0.
    """

    @defer.inlineCallbacks
    def check(self, store):
        self.assertEqual((yield store.get_message("msg1")).key_epoch, 0)
        self.assertEqual((yield store.current_key_epoch("m1")), 0)
        outcome = yield store.rotate_mesh_key(
            KeyRotation("m1", 1, "u1", "k", "manual", NOW, (("u1", "sealed"),)))
        self.assertTrue(outcome.stored)
        self.assertEqual((yield store.get_mesh_key_copy("m1", 1, "u1")).sealed_key, "sealed")

    @defer.inlineCallbacks
    def test_sqlite_v3_to_current(self):
        """A version-3 SQLite file gains the key epoch column and tables, rows kept."""
        path = self.mktemp() + ".sqlite3"
        connection = sqlite3.connect(path)
        for statement in split_statements(full_schema(3)):
            connection.execute(statement)
        connection.execute("INSERT INTO schema_version (version) VALUES (3)")
        for statement in V3_ROWS:
            connection.execute(statement)
        connection.commit()
        connection.close()
        store = SQLiteStore(path, reactor)
        yield store.open()
        self.addCleanup(store.close)
        yield self.check(store)
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("SELECT version FROM schema_version").fetchall(),
                         [(CURRENT_VERSION,)])

    @defer.inlineCallbacks
    def test_postgres_v3_to_current(self):
        """A version-3 Postgres schema is upgraded the same way."""
        if PG_SKIP:
            raise SkipTest(PG_SKIP)
        schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, schema)
        pg.run(PG_DSN, 'CREATE SCHEMA "%s"' % (schema,))
        script = 'SET search_path TO "%s"; ' % (schema,) + ";\n".join(
            split_statements(full_schema(3)) + ["INSERT INTO schema_version VALUES (3)"]
            + list(V3_ROWS))
        pg.run(PG_DSN, script)
        store = PostgresStore(PG_DSN, schema, reactor)
        yield store.open()
        self.addCleanup(store.close)
        yield self.check(store)
        self.assertEqual(pg.run(PG_DSN, 'SELECT version FROM "%s".schema_version' % (schema,)),
                         [(CURRENT_VERSION,)])
