"""
Mesh key epochs (issue 17): the rotations of each mesh's key and every
member's sealed copy of each epoch's key.

The broker never holds a mesh key: a copy is an opaque blob the rotating
client sealed to one member's key. A rotation is one transaction that
checks the epoch is the next one and that the copies cover exactly the
current (not banned) members, then stores the epoch, every copy and its
audit entry; anything less stores nothing, so the previous epoch stays
current. Epoch 0 is the key of the invite links and has no row.
"""

import json

import attr

from claudemesh.store.records import (
    Departure,
    KeyUpload,
    MemberRecord,
    MeshKeyReport,
    SealedKeyCopy,
)
from claudemesh.store.sql.audit import append_audit_txn
from claudemesh.store.sql.meshes import MEMBER_COLUMNS, select_members_txn
from claudemesh.store.sql.operations import InsertRows, Query

EPOCH_COLUMNS = ("mesh_id", "epoch", "rotated_by", "sealed_by", "reason", "created_at")
COPY_COLUMNS = tuple(f.name for f in attr.fields(SealedKeyCopy))
# The audit events that take a member's key away from the mesh (the member
# still holds the mesh key it had), and the rotation. Queries name them
# literally, as the partial index audit_log_key_events does, so that both
# databases use that index.
DEPARTURE_EVENTS = ("member_banned", "member_left")
ROTATED_EVENT = "mesh_key_rotated"
KEY_EVENTS = "event_type IN ('member_banned', 'member_left', 'mesh_key_rotated')"


def current_epoch_txn(mesh_id):
    rows = yield Query(
        "SELECT COALESCE(MAX(epoch), 0) FROM mesh_key_epochs WHERE mesh_id = %s", (mesh_id,))
    return int(rows[0][0])


def current_member_ids_txn(dialect, mesh_id):
    """
    The ids of the mesh's members in good standing. On Postgres their rows
    are locked until the transaction ends, so a ban or a leave committing
    meanwhile is waited for and seen (dialect C{row_lock}).
    """
    rows = yield Query(
        "SELECT id FROM members WHERE mesh_id = %%s AND revoked_at IS NULL%s"
        % (dialect.row_lock,), (mesh_id,))
    return {row[0] for row in rows}


def epoch_made_at_txn(mesh_id, epoch):
    """
    When C{epoch} was committed (milliseconds), or C{None} (epoch 0 or none).
    """
    rows = yield Query(
        "SELECT created_at FROM mesh_key_epochs WHERE mesh_id = %s AND epoch = %s",
        (mesh_id, epoch))
    return int(rows[0][0]) if rows else None


def insert_copies_txn(mesh_id, epoch, copies, sealed_by, created_at, conflict=""):
    yield InsertRows(
        "mesh_key_copies", COPY_COLUMNS,
        [(mesh_id, epoch, member_id, sealed, sealed_by, created_at)
         for member_id, sealed in copies],
        conflict)


class MeshKeyStore:
    """
    The mesh key half of L{claudemesh.store.sql.SQLStore}.
    """

    def current_key_epoch(self, mesh_id):
        return self.run_interaction(
            "current_key_epoch", current_epoch_txn, mesh_id, write=False)

    def rotate_mesh_key(self, rotation, audit=()):
        return self.run_interaction(
            "rotate_mesh_key", self._rotate_mesh_key_txn, rotation, list(audit))

    def _rotate_mesh_key_txn(self, rotation, audit):
        dialect = self.dialect
        # The members first: on Postgres their rows stay locked, which also
        # makes a second rotation of this mesh wait for the first and then
        # read the epoch it committed. (Taking the audit chain's lock first
        # would deadlock with a ban, which locks the row, then the chain.)
        members = yield from current_member_ids_txn(dialect, rotation.mesh_id)
        current = yield from current_epoch_txn(rotation.mesh_id)
        if rotation.epoch != current + 1:
            return KeyUpload(False, current)
        named = {member_id for member_id, _ in rotation.copies}
        if named != members or len(named) != len(rotation.copies):
            return KeyUpload(False, current, missing=tuple(sorted(members - named)),
                             unexpected=tuple(sorted(named - members)))
        yield InsertRows("mesh_key_epochs", EPOCH_COLUMNS, [(
            rotation.mesh_id, rotation.epoch, rotation.rotated_by, rotation.sealed_by,
            rotation.reason, rotation.created_at)])
        yield from insert_copies_txn(rotation.mesh_id, rotation.epoch, rotation.copies,
                                     rotation.sealed_by, rotation.created_at)
        yield from append_audit_txn(dialect, audit)
        return KeyUpload(True, rotation.epoch, shared=len(rotation.copies))

    def share_mesh_key(self, mesh_id, epoch, copies, sealed_by, created_at):
        return self.run_interaction(
            "share_mesh_key", self._share_mesh_key_txn, mesh_id, epoch, tuple(copies),
            sealed_by, created_at)

    def _share_mesh_key_txn(self, mesh_id, epoch, copies, sealed_by, created_at):
        members = yield from current_member_ids_txn(self.dialect, mesh_id)
        current = yield from current_epoch_txn(mesh_id)
        if epoch != current or epoch == 0:
            return KeyUpload(False, current)
        unexpected = tuple(sorted({m for m, _ in copies} - members))
        if unexpected:
            return KeyUpload(False, current, unexpected=unexpected)
        rows = yield Query(
            "SELECT member_id FROM mesh_key_copies WHERE mesh_id = %s AND epoch = %s",
            (mesh_id, epoch))
        have = {row[0] for row in rows}
        shut_out = yield from self._shut_out_txn(
            mesh_id, epoch, {m for m, _ in copies} - have)
        if shut_out:
            return KeyUpload(False, current, shut_out=shut_out)
        fresh = [(m, sealed) for m, sealed in copies if m not in have]
        # A copy, once stored, is never replaced: the first sharer wins, also
        # against a concurrent one.
        yield from insert_copies_txn(mesh_id, epoch, fresh, sealed_by, created_at,
                                     "ON CONFLICT (mesh_id, epoch, member_id) DO NOTHING")
        return KeyUpload(True, current, shared=len(fresh))

    def _shut_out_txn(self, mesh_id, epoch, member_ids):
        """
        Those of C{member_ids} (without a copy of C{epoch}) that joined
        before the epoch was made: a rotation seals for every member in good
        standing, so they were banned then (decision 87).
        """
        if not member_ids:
            return ()
        made_at = yield from epoch_made_at_txn(mesh_id, epoch)
        members = yield from select_members_txn("mesh_id = %s", (mesh_id,))
        return tuple(sorted(m.id for m in members
                            if m.id in member_ids and m.joined_at < made_at))

    def key_epoch_made_at(self, mesh_id, epoch):
        return self.run_interaction(
            "key_epoch_made_at", epoch_made_at_txn, mesh_id, epoch, write=False)

    def get_mesh_key_copy(self, mesh_id, epoch, member_id):
        return self.run_interaction(
            "get_mesh_key_copy", self._get_copy_txn, mesh_id, epoch, member_id, write=False)

    def _get_copy_txn(self, mesh_id, epoch, member_id):
        rows = yield Query(
            "SELECT %s FROM mesh_key_copies WHERE mesh_id = %%s AND epoch = %%s"
            " AND member_id = %%s" % (", ".join(COPY_COLUMNS),),
            (mesh_id, epoch, member_id))
        return SealedKeyCopy(*rows[0]) if rows else None

    def mesh_key_report(self, mesh_id, limit):
        return self.run_interaction(
            "mesh_key_report", self._mesh_key_report_txn, mesh_id, limit, write=False)

    def _mesh_key_report_txn(self, mesh_id, limit):
        epoch = yield from current_epoch_txn(mesh_id)
        rows = yield Query(
            "SELECT COALESCE(MAX(seq), 0) FROM audit_log WHERE mesh_id = %%s AND %s"
            " AND event_type = %%s" % (KEY_EVENTS,), (mesh_id, ROTATED_EVENT))
        since = int(rows[0][0])
        rows = yield Query(
            "SELECT event_type, payload, created_at FROM audit_log WHERE mesh_id = %%s"
            " AND %s AND event_type IN (%%s, %%s) AND seq > %%s ORDER BY seq" % (KEY_EVENTS,),
            (mesh_id,) + DEPARTURE_EVENTS + (since,))
        members = yield from select_members_txn("mesh_id = %s", (mesh_id,))
        standing = {m.pubkey for m in members if m.revoked_at is None}
        departures = {}
        for event_type, payload, created_at in rows:
            payload = json.loads(payload)
            pubkey = payload.get("targetPubkey") or payload.get("pubkey")
            if not isinstance(pubkey, str) or pubkey in standing:
                # Unbanned (then in shut_out, when the key was made while
                # it was banned) or joined again: not a departure any more.
                continue
            name = payload.get("target") or payload.get("name")
            departures.pop(pubkey, None)
            departures[pubkey] = Departure(event_type, pubkey,
                                           name if isinstance(name, str) else None,
                                           int(created_at))
        without, shut_out = (), ()
        if epoch:
            made_at = yield from epoch_made_at_txn(mesh_id, epoch)
            query = (
                "SELECT %s FROM members m WHERE m.mesh_id = %%s AND m.revoked_at IS NULL"
                " AND m.joined_at %s %%s"
                " AND NOT EXISTS (SELECT 1 FROM mesh_key_copies c WHERE c.mesh_id = m.mesh_id"
                " AND c.epoch = %%s AND c.member_id = m.id)"
                " ORDER BY m.joined_at, m.id LIMIT %%s")
            columns = ", ".join("m." + c for c in MEMBER_COLUMNS)
            rows = yield Query(query % (columns, ">="), (mesh_id, made_at, epoch, limit))
            without = tuple(MemberRecord(*row) for row in rows)
            rows = yield Query(query % (columns, "<"), (mesh_id, made_at, epoch, limit))
            shut_out = tuple(MemberRecord(*row) for row in rows)
        return MeshKeyReport(epoch, tuple(departures.values()), without, shut_out)
