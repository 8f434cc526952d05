"""
Meshes, members and invites, and the membership actions on them.

Each action of the broker's membership domain (create a mesh, join, change a
role or hand ownership over, ban, unban, leave, create or revoke an invite)
is one named transaction that also appends its audit entry: it is stored
whole or not at all, and its audit row commits exactly when it does.
"""

import attr

from claudemesh.store.records import InviteRecord, JoinOutcome, MemberRecord, MeshRecord
from claudemesh.store.sql.audit import append_audit_txn
from claudemesh.store.sql.operations import Execute, InsertRows, Query

MESH_COLUMNS = ("id", "name", "slug", "owner_pubkey", "created_at")
MEMBER_COLUMNS = (
    "id",
    "mesh_id",
    "pubkey",
    "display_name",
    "role",
    "joined_at",
    "invite_id",
    "revoked_at",
)
INVITE_COLUMNS = (
    "id",
    "mesh_id",
    "role",
    "max_uses",
    "expires_at",
    "created_by",
    "created_at",
    "used_count",
    "revoked_at",
)


def select_members_txn(where, params):
    rows = yield Query(
        "SELECT %s FROM members WHERE %s ORDER BY joined_at, id"
        % (", ".join(MEMBER_COLUMNS), where),
        params,
    )
    return [MemberRecord(*row) for row in rows]


def select_invites_txn(where, params):
    rows = yield Query(
        "SELECT %s FROM invites WHERE %s ORDER BY created_at, id"
        % (", ".join(INVITE_COLUMNS), where),
        params,
    )
    return [InviteRecord(**dict(zip(INVITE_COLUMNS, row))) for row in rows]


def revoke_invites_beyond_txn(member_id, role, now):
    """
    Revoke the open invites C{member_id} made that C{role} could not make
    (all of them for C{"member"} or C{None}; admin invites for
    C{"admin"}). An invite is worth what its creator may do when it was
    made, and stays dead once that right is lost: promoting the creator
    again does not bring it back (issue 11). Fires with how many.
    """
    if role == "owner":
        return 0
    sql = "UPDATE invites SET revoked_at = %s WHERE created_by = %s AND revoked_at IS NULL"
    if role == "admin":
        sql += " AND role <> 'member'"
    count = yield Execute(sql, (now, member_id))
    return count


def insert_member_txn(member):
    yield InsertRows("members", MEMBER_COLUMNS, [attr.astuple(member)])


class MeshStore:
    """
    The membership half of L{claudemesh.store.sql.SQLStore}.
    """

    # -- meshes and members --------------------------------------------------

    def create_mesh(self, mesh, owner, audit=()):
        return self.run_interaction(
            "create_mesh", self._create_mesh_txn, mesh, owner, list(audit))

    def _create_mesh_txn(self, mesh, owner, audit):
        yield InsertRows("meshes", MESH_COLUMNS, [attr.astuple(mesh)])
        yield from insert_member_txn(owner)
        yield from append_audit_txn(self.dialect, audit)

    def get_mesh(self, mesh_id):
        return self.run_interaction("get_mesh", self._get_mesh_txn, mesh_id, write=False)

    def _get_mesh_txn(self, mesh_id):
        rows = yield Query(
            "SELECT %s FROM meshes WHERE id = %%s" % (", ".join(MESH_COLUMNS),), (mesh_id,))
        return MeshRecord(*rows[0]) if rows else None

    def add_member(self, member):
        return self.run_interaction("add_member", insert_member_txn, member)

    def get_member(self, member_id):
        return self.run_interaction("get_member", self._one_member_txn, "id = %s",
                                    (member_id,), write=False)

    def find_member(self, mesh_id, pubkey):
        return self.run_interaction("find_member", self._one_member_txn,
                                    "mesh_id = %s AND pubkey = %s", (mesh_id, pubkey),
                                    write=False)

    def _one_member_txn(self, where, params):
        found = yield from select_members_txn(where, params)
        return found[0] if found else None

    def list_members(self, mesh_id):
        return self.run_interaction("list_members", select_members_txn, "mesh_id = %s",
                                    (mesh_id,), write=False)

    # -- membership actions --------------------------------------------------

    def join_member(self, member, now, audit=()):
        """
        See L{IStore.join_member}.
        """
        return self.run_interaction("join_member", self._join_member_txn, member, now,
                                    list(audit))

    def _join_member_txn(self, member, now, audit):
        found = yield from select_members_txn(
            "mesh_id = %s AND pubkey = %s", (member.mesh_id, member.pubkey))
        if found:
            return JoinOutcome(found[0], joined=False)
        # One conditional UPDATE: the row lock makes concurrent joiners
        # queue, and each re-checks used_count < max_uses after the previous
        # one committed, so a one-use invite is taken exactly once.
        taken = yield Execute(
            "UPDATE invites SET used_count = used_count + 1"
            " WHERE id = %s AND used_count < max_uses AND revoked_at IS NULL"
            " AND expires_at > %s",
            (member.invite_id, now),
        )
        if not taken:
            return JoinOutcome(None, joined=False)
        # Should the same key join concurrently, this INSERT fails with
        # DuplicateKey and the use taken above is rolled back with it.
        yield from insert_member_txn(member)
        yield from append_audit_txn(self.dialect, audit)
        return JoinOutcome(member, joined=True)

    def set_member_role(self, member_id, role, now, audit=()):
        return self.run_interaction("set_member_role", self._set_member_role_txn,
                                    member_id, role, now, list(audit))

    def _set_member_role_txn(self, member_id, role, now, audit):
        count = yield Execute("UPDATE members SET role = %s WHERE id = %s", (role, member_id))
        if count:
            yield from revoke_invites_beyond_txn(member_id, role, now)
            yield from append_audit_txn(self.dialect, audit)
        return count > 0

    def hand_over_ownership(self, owner_id, heir_id, now, audit=()):
        return self.run_interaction("hand_over_ownership", self._hand_over_ownership_txn,
                                    owner_id, heir_id, now, list(audit))

    def _hand_over_ownership_txn(self, owner_id, heir_id, now, audit):
        # The heir first: at no point does the mesh have no owner, and the
        # transaction makes "two owners" invisible to everyone else.
        count = yield Execute(
            "UPDATE members SET role = 'owner' WHERE id = %s AND revoked_at IS NULL",
            (heir_id,))
        if not count:
            return False
        yield Execute(
            "UPDATE members SET role = 'admin' WHERE id = %s AND role = 'owner'", (owner_id,))
        yield from revoke_invites_beyond_txn(owner_id, "admin", now)
        yield from append_audit_txn(self.dialect, audit)
        return True

    def ban_member(self, member_id, revoked_at, audit=()):
        return self.run_interaction("ban_member", self._ban_member_txn, member_id,
                                    revoked_at, list(audit))

    def _ban_member_txn(self, member_id, revoked_at, audit):
        count = yield Execute(
            "UPDATE members SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
            (revoked_at, member_id))
        if not count:
            return False
        # A ban is per key: the invite that key came with goes too, and so
        # do the invites it made (an unban must not bring them back).
        yield Execute(
            "UPDATE invites SET revoked_at = %s WHERE revoked_at IS NULL"
            " AND id = (SELECT invite_id FROM members WHERE id = %s)",
            (revoked_at, member_id))
        yield from revoke_invites_beyond_txn(member_id, None, revoked_at)
        yield from append_audit_txn(self.dialect, audit)
        return True

    def unban_member(self, member_id, audit=()):
        return self.run_interaction("unban_member", self._unban_member_txn, member_id,
                                    list(audit))

    def _unban_member_txn(self, member_id, audit):
        count = yield Execute(
            "UPDATE members SET revoked_at = NULL WHERE id = %s AND revoked_at IS NOT NULL",
            (member_id,))
        if count:
            yield from append_audit_txn(self.dialect, audit)
        return count > 0

    def remove_member(self, member_id, audit=()):
        return self.run_interaction("remove_member", self._remove_member_txn, member_id,
                                    list(audit))

    def _remove_member_txn(self, member_id, audit):
        yield Execute(
            "DELETE FROM deliveries WHERE member_id = %s AND state IN ('queued', 'leased')",
            (member_id,))
        # Its session keys are free again (a rejoined key may present them).
        yield Execute("DELETE FROM session_keys WHERE member_id = %s", (member_id,))
        count = yield Execute("DELETE FROM members WHERE id = %s", (member_id,))
        if count:
            yield from append_audit_txn(self.dialect, audit)
        return count > 0

    # -- invites -------------------------------------------------------------

    def create_invite(self, invite, audit=()):
        return self.run_interaction("create_invite", self._create_invite_txn, invite,
                                    list(audit))

    def _create_invite_txn(self, invite, audit):
        yield InsertRows("invites", INVITE_COLUMNS,
                         [tuple(getattr(invite, column) for column in INVITE_COLUMNS)])
        yield from append_audit_txn(self.dialect, audit)

    def get_invite(self, invite_id):
        return self.run_interaction("get_invite", self._one_invite_txn, invite_id,
                                    write=False)

    def _one_invite_txn(self, invite_id):
        found = yield from select_invites_txn("id = %s", (invite_id,))
        return found[0] if found else None

    def list_invites(self, mesh_id):
        return self.run_interaction("list_invites", select_invites_txn, "mesh_id = %s",
                                    (mesh_id,), write=False)

    def revoke_invite(self, invite_id, revoked_at, audit=()):
        return self.run_interaction("revoke_invite", self._revoke_invite_txn, invite_id,
                                    revoked_at, list(audit))

    def _revoke_invite_txn(self, invite_id, revoked_at, audit):
        count = yield Execute(
            "UPDATE invites SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
            (revoked_at, invite_id))
        if count:
            yield from append_audit_txn(self.dialect, audit)
        return count > 0
