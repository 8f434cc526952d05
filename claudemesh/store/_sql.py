"""
The SQL shared by the SQLite and Postgres stores.

Every store operation is written once, as a generator that yields SQL
operations (L{Query}, L{Execute}, L{InsertRows}) and receives their results.
Each backend drives these generators its own way inside one transaction:
SQLite synchronously in the adbapi thread, Postgres asynchronously through
txpostgres. This keeps one copy of the semantics for both backends, while the
few places where they must differ (how C{seq} is assigned, how the audit
chain and the claim are made safe under concurrency, the schema prologue) are
methods the backend provides.

SQL text uses C{%s} placeholders (psycopg2's style); the SQLite driver
rewrites them to C{?}. No statement here contains a literal C{%}.
"""

import json

import attr
from twisted.internet import defer
from zope.interface import implementer

from claudemesh.audit import GENESIS, canonical_json, chain_hash, chain_hash_text
from claudemesh.store.interface import IStore
from claudemesh.store.records import (
    AuditEntry,
    ChainVerification,
    ClaimedDelivery,
    DeliveryRecord,
    EnqueueResult,
    InviteRecord,
    MemberRecord,
    MeshRecord,
    NewMessage,
    SessionRecord,
)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Query:
    """
    A statement whose rows are wanted: the driver sends back a list of
    tuples.
    """

    sql: str
    params: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Execute:
    """
    A statement run for its effect: the driver sends back its row count.
    """

    sql: str
    params: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class InsertRows:
    """
    Insert many rows into one table in one round trip (SQLite:
    C{executemany}; Postgres: one multi-row C{INSERT}). C{conflict} is an
    optional C{ON CONFLICT …} clause. The driver sends back C{None}.
    """

    table: str
    columns: tuple
    rows: list
    conflict: str = ""

    def statement(self, values_sql: str) -> str:
        return "INSERT INTO %s (%s) VALUES %s %s" % (
            self.table,
            ", ".join(self.columns),
            values_sql,
            self.conflict,
        )


# SQLite allows 32766 bound variables per statement; stay well below it for
# the IN lists built here, whatever the tuple width.
CHUNK = 500

# How many audit rows verify_chain reads per query.
VERIFY_PAGE = 1000


def chunks(items, size=CHUNK):
    items = list(items)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def placeholders(count: int, width: int = 1) -> str:
    """
    C{%s, %s} for single values or C{(%s, %s), (%s, %s)} for tuples.
    """
    if width == 1:
        return ", ".join(["%s"] * count)
    one = "(" + ", ".join(["%s"] * width) + ")"
    return ", ".join([one] * count)


def flatten(pairs):
    return tuple(value for pair in pairs for value in pair)


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
SESSION_COLUMNS = tuple(f.name for f in attr.fields(SessionRecord))
MESSAGE_COLUMNS = (
    "id",
    "mesh_id",
    "sender_member_id",
    "sender_pubkey",
    "sender_member_pubkey",
    "target_spec",
    "priority",
    "nonce",
    "ciphertext",
    "created_at",
    "expires_at",
    "seq",
)
DELIVERY_COLUMNS = (
    "message_id",
    "recipient_key",
    "recipient_kind",
    "mesh_id",
    "member_id",
    "group_name",
    "priority",
    "seq",
    "state",
    "attempts",
    "expires_at",
    "lease_session",
    "lease_until",
)
DELIVERY_RECORD_COLUMNS = tuple(f.name for f in attr.fields(DeliveryRecord))
SEND_KEY_COLUMNS = ("sender_member_id", "client_id", "message_id", "expires_at")
AUDIT_COLUMNS = (
    "mesh_id",
    "seq",
    "event_type",
    "actor",
    "payload",
    "prev_hash",
    "hash",
    "created_at",
)

# What update_sessions may change, with the SQL type Postgres needs to cast
# an untyped VALUES column to.
SESSION_UPDATABLE = {
    "status": "text",
    "status_source": "text",
    "status_updated_at": "bigint",
    "summary": "text",
    "groups": "text",
    "display_name": "text",
    "last_active_at": "bigint",
}

CLAIMED_SELECT = (
    "{d}.message_id, {d}.recipient_key, {d}.recipient_kind, {d}.mesh_id, "
    "{d}.member_id, m.sender_pubkey, m.sender_member_pubkey, m.target_spec, "
    "{d}.priority, m.nonce, m.ciphertext, m.created_at, {d}.seq, {d}.attempts"
)


def session_row(session: SessionRecord) -> tuple:
    values = attr.astuple(session, recurse=False)
    row = list(values)
    row[SESSION_COLUMNS.index("groups")] = json.dumps(list(session.groups))
    row[SESSION_COLUMNS.index("receive")] = 1 if session.receive else 0
    return tuple(row)


def session_from_row(row) -> SessionRecord:
    values = dict(zip(SESSION_COLUMNS, row))
    values["groups"] = tuple(json.loads(values["groups"]))
    values["receive"] = bool(values["receive"])
    return SessionRecord(**values)


def session_column_value(column: str, value):
    """
    The stored form of one updatable session column.
    """
    if column == "groups":
        return json.dumps(list(value))
    return value


def merge_session_updates(updates):
    """
    Fold C{[(presence_id, {column: value})]} into one dict per session (a
    later update of a column wins), rejecting unknown columns.
    """
    merged = {}
    for presence_id, changes in updates:
        for column in changes:
            if column not in SESSION_UPDATABLE:
                raise ValueError("session column %r cannot be updated" % (column,))
        merged.setdefault(presence_id, {}).update(changes)
    return merged


def claimable_where(member_id, session_pubkey, groups, priorities, now, alias="d"):
    """
    The C{WHERE} clause (and its parameters) selecting the deliveries one
    session may lease now.
    """
    d = alias
    params = [member_id]
    groups = list(groups)
    if groups:
        group_sql = "(%s.group_name IS NULL OR %s.group_name IN (%s))" % (
            d,
            d,
            placeholders(len(groups)),
        )
        params.extend(groups)
    else:
        group_sql = "%s.group_name IS NULL" % (d,)
    who = "(%s.recipient_kind = 'member' AND %s.member_id = %%s AND %s)" % (
        d,
        d,
        group_sql,
    )
    if session_pubkey:
        who = "(%s OR (%s.recipient_kind = 'session' AND %s.recipient_key = %%s))" % (
            who,
            d,
            d,
        )
        params.append(session_pubkey)
    priorities = list(priorities)
    params.extend(priorities)
    params.extend([now, now])
    sql = (
        "%s AND %s.priority IN (%s) AND %s.expires_at > %%s"
        # state IN (...) first: it lets the (member_id, state, seq) and
        # (recipient_key, state, seq) indexes skip delivered history.
        " AND %s.state IN ('queued', 'leased')"
        " AND (%s.state = 'queued' OR %s.lease_until <= %%s)"
        % (who, d, placeholders(len(priorities)), d, d, d, d)
    )
    return sql, tuple(params)


def audit_from_row(row) -> AuditEntry:
    mesh_id, seq, event_type, actor, payload, prev_hash, hash_, created_at = row
    return AuditEntry(
        mesh_id=mesh_id,
        seq=int(seq),
        event_type=event_type,
        actor=actor,
        payload=json.loads(payload),
        prev_hash=prev_hash,
        hash=hash_,
        created_at=int(created_at),
    )


def claimed_from_row(row, attempts_delta=0) -> ClaimedDelivery:
    values = list(row)
    values[-1] = int(values[-1]) + attempts_delta
    return ClaimedDelivery(*values)


@implementer(IStore)
class SQLStore:
    """
    The L{IStore} methods, in SQL, for a backend that provides:

      - C{_transact(operation, *args, write=True)}: run the generator
        function C{operation(*args)} in one transaction, firing with its
        value and with the store's errors mapped;
      - C{_next_seqs(count)}: (a generator) C{count} new message sequence
        numbers;
      - C{_lock_chains(mesh_ids)}: (a generator) serialise appends to these
        meshes' audit chains until the transaction ends;
      - C{_claim(...)}: (a generator) the claim itself;
      - the dialect hooks of L{claudemesh.store.schema.migrate}.
    """

    # -- meshes and members -------------------------------------------------

    def create_mesh(self, mesh, owner):
        return self._transact(self._create_mesh, mesh, owner)

    def _create_mesh(self, mesh, owner):
        yield InsertRows("meshes", MESH_COLUMNS, [attr.astuple(mesh)])
        yield InsertRows("members", MEMBER_COLUMNS, [attr.astuple(owner)])

    def get_mesh(self, mesh_id):
        return self._transact(self._get_mesh, mesh_id, write=False)

    def _get_mesh(self, mesh_id):
        rows = yield Query(
            "SELECT %s FROM meshes WHERE id = %%s" % (", ".join(MESH_COLUMNS),),
            (mesh_id,),
        )
        return MeshRecord(*rows[0]) if rows else None

    def add_member(self, member):
        return self._transact(self._add_member, member)

    def _add_member(self, member):
        yield InsertRows("members", MEMBER_COLUMNS, [attr.astuple(member)])

    def _select_members(self, where, params):
        rows = yield Query(
            "SELECT %s FROM members WHERE %s ORDER BY joined_at, id"
            % (", ".join(MEMBER_COLUMNS), where),
            params,
        )
        return [MemberRecord(*row) for row in rows]

    def get_member(self, member_id):
        return self._transact(self._get_member, member_id, write=False)

    def _get_member(self, member_id):
        found = yield from self._select_members("id = %s", (member_id,))
        return found[0] if found else None

    def find_member(self, mesh_id, pubkey):
        return self._transact(self._find_member, mesh_id, pubkey, write=False)

    def _find_member(self, mesh_id, pubkey):
        found = yield from self._select_members(
            "mesh_id = %s AND pubkey = %s", (mesh_id, pubkey)
        )
        return found[0] if found else None

    def list_members(self, mesh_id):
        return self._transact(
            self._select_members, "mesh_id = %s", (mesh_id,), write=False
        )

    def set_member_role(self, member_id, role):
        return self._transact(self._set_member_role, member_id, role)

    def _set_member_role(self, member_id, role):
        count = yield Execute(
            "UPDATE members SET role = %s WHERE id = %s", (role, member_id)
        )
        return count > 0

    def set_member_revoked(self, member_id, revoked_at):
        return self._transact(self._set_member_revoked, member_id, revoked_at)

    def _set_member_revoked(self, member_id, revoked_at):
        count = yield Execute(
            "UPDATE members SET revoked_at = %s WHERE id = %s",
            (revoked_at, member_id),
        )
        return count > 0

    def remove_member(self, member_id):
        return self._transact(self._remove_member, member_id)

    def _remove_member(self, member_id):
        yield Execute(
            "DELETE FROM deliveries WHERE member_id = %s"
            " AND state IN ('queued', 'leased')",
            (member_id,),
        )
        count = yield Execute("DELETE FROM members WHERE id = %s", (member_id,))
        return count > 0

    # -- invites ------------------------------------------------------------

    def create_invite(self, invite):
        return self._transact(self._create_invite, invite)

    def _create_invite(self, invite):
        yield InsertRows(
            "invites",
            INVITE_COLUMNS,
            [tuple(getattr(invite, column) for column in INVITE_COLUMNS)],
        )

    def _select_invites(self, where, params):
        rows = yield Query(
            "SELECT %s FROM invites WHERE %s ORDER BY created_at, id"
            % (", ".join(INVITE_COLUMNS), where),
            params,
        )
        return [InviteRecord(**dict(zip(INVITE_COLUMNS, row))) for row in rows]

    def get_invite(self, invite_id):
        return self._transact(self._get_invite, invite_id, write=False)

    def _get_invite(self, invite_id):
        found = yield from self._select_invites("id = %s", (invite_id,))
        return found[0] if found else None

    def list_invites(self, mesh_id):
        return self._transact(
            self._select_invites, "mesh_id = %s", (mesh_id,), write=False
        )

    def revoke_invite(self, invite_id, revoked_at):
        return self._transact(self._revoke_invite, invite_id, revoked_at)

    def _revoke_invite(self, invite_id, revoked_at):
        count = yield Execute(
            "UPDATE invites SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
            (revoked_at, invite_id),
        )
        return count > 0

    def consume_invite(self, invite_id, now):
        return self._transact(self._consume_invite, invite_id, now)

    def _consume_invite(self, invite_id, now):
        # One conditional UPDATE: the row lock makes concurrent consumers
        # queue, and each re-checks used_count < max_uses after the previous
        # one committed, so a one-use invite is taken exactly once.
        count = yield Execute(
            "UPDATE invites SET used_count = used_count + 1"
            " WHERE id = %s AND used_count < max_uses AND revoked_at IS NULL"
            " AND expires_at > %s",
            (invite_id, now),
        )
        return count > 0

    # -- the session mirror -------------------------------------------------

    def open_sessions(self, sessions):
        return self._transact(self._open_sessions, sessions)

    def _open_sessions(self, sessions):
        # The last record for a presence id wins, as it would have with one
        # statement per session; Postgres refuses one INSERT touching a row
        # twice, hence the fold.
        latest = {session.presence_id: session for session in sessions}
        if not latest:
            return
        others = [c for c in SESSION_COLUMNS if c != "presence_id"]
        conflict = "ON CONFLICT (presence_id) DO UPDATE SET " + ", ".join(
            "%s = excluded.%s" % (column, column) for column in others
        )
        yield InsertRows(
            "sessions",
            SESSION_COLUMNS,
            [session_row(session) for session in latest.values()],
            conflict,
        )

    def update_sessions(self, updates):
        return self._transact(self._update_sessions, updates)

    def _update_sessions(self, updates):
        merged = merge_session_updates(updates)
        # Sessions changing the same columns share one statement.
        groups = {}
        for presence_id, changes in merged.items():
            columns = tuple(sorted(changes))
            if columns:
                row = tuple(
                    session_column_value(column, changes[column]) for column in columns
                )
                groups.setdefault(columns, []).append(row + (presence_id,))
        for columns, rows in groups.items():
            yield from self._update_session_rows(columns, rows)

    def _update_session_rows(self, columns, rows):
        """
        Apply C{rows} (values of C{columns}, then the presence id) to the
        sessions table. The portable form is one UPDATE per row; the
        Postgres store overrides it with a single C{UPDATE … FROM (VALUES …)}.
        """
        sql = "UPDATE sessions SET %s WHERE presence_id = %%s" % (
            ", ".join("%s = %%s" % (column,) for column in columns),
        )
        for row in rows:
            yield Execute(sql, row)

    def close_sessions(self, presence_ids, disconnected_at):
        return self._transact(self._close_sessions, presence_ids, disconnected_at)

    def _close_sessions(self, presence_ids, disconnected_at):
        closed = 0
        for chunk in chunks(set(presence_ids)):
            closed += yield Execute(
                "UPDATE sessions SET disconnected_at = %%s"
                " WHERE presence_id IN (%s) AND disconnected_at IS NULL"
                % (placeholders(len(chunk)),),
                (disconnected_at,) + tuple(chunk),
            )
        yield from self._release_leases(presence_ids)
        return closed

    def close_all_sessions(self, disconnected_at):
        return self._transact(self._close_all_sessions, disconnected_at)

    def _close_all_sessions(self, disconnected_at):
        closed = yield Execute(
            "UPDATE sessions SET disconnected_at = %s WHERE disconnected_at IS NULL",
            (disconnected_at,),
        )
        yield Execute(
            "UPDATE deliveries SET state = 'queued', lease_session = NULL,"
            " lease_until = NULL WHERE state = 'leased'"
        )
        return closed

    def list_open_sessions(self, mesh_id):
        return self._transact(self._list_open_sessions, mesh_id, write=False)

    def _list_open_sessions(self, mesh_id):
        rows = yield Query(
            "SELECT %s FROM sessions WHERE mesh_id = %%s AND disconnected_at IS NULL"
            " ORDER BY connected_at, presence_id" % (", ".join(SESSION_COLUMNS),),
            (mesh_id,),
        )
        return [session_from_row(row) for row in rows]

    # -- messages and deliveries -------------------------------------------

    def enqueue(self, messages, audit=()):
        return self._transact(self._enqueue, list(messages), list(audit))

    def _enqueue(self, messages, audit):
        keys = sorted(
            {
                (message.sender_member_id, message.client_id)
                for message in messages
                if message.client_id is not None
            }
        )
        # Existing send keys of the whole batch, in one query per CHUNK.
        known = {}
        for chunk in chunks(keys):
            senders = sorted({sender for sender, _ in chunk})
            client_ids = sorted({client_id for _, client_id in chunk})
            # The plain IN lists let both databases search the primary key;
            # the row-value test alone made SQLite scan the whole table.
            rows = yield Query(
                "SELECT k.sender_member_id, k.client_id, k.message_id,"
                " k.expires_at, m.seq FROM send_keys k"
                " LEFT JOIN messages m ON m.id = k.message_id"
                " WHERE k.sender_member_id IN (%s) AND k.client_id IN (%s)"
                " AND (k.sender_member_id, k.client_id) IN (VALUES %s)"
                % (placeholders(len(senders)), placeholders(len(client_ids)),
                   placeholders(len(chunk), 2)),
                tuple(senders) + tuple(client_ids) + flatten(chunk),
            )
            for sender, client_id, message_id, expires_at, seq in rows:
                known[(sender, client_id)] = (message_id, int(expires_at), seq)

        results = [None] * len(messages)
        first_in_batch = {}
        fresh = []
        for index, message in enumerate(messages):
            if message.client_id is not None:
                key = (message.sender_member_id, message.client_id)
                if key in first_in_batch:
                    results[index] = first_in_batch[key]
                    continue
                hit = known.get(key)
                # A key counts until its expiry, judged at the retry's own
                # creation time (enqueue has no other clock).
                if hit is not None and hit[1] > message.created_at:
                    message_id, _, seq = hit
                    # The original message may have been pruned already while
                    # its key lives on: still a duplicate (delivering it again
                    # is the worse outcome), with seq 0 for "unknown".
                    results[index] = EnqueueResult(
                        message_id, int(seq) if seq is not None else 0, True
                    )
                    continue
                first_in_batch[key] = index
            fresh.append(index)

        seqs = yield from self._next_seqs(len(fresh))
        message_rows = []
        delivery_rows = []
        key_rows = []
        for index, seq in zip(fresh, seqs):
            message = messages[index]
            results[index] = EnqueueResult(message.id, seq)
            message_rows.append(
                tuple(getattr(message, c) for c in MESSAGE_COLUMNS[:-1]) + (seq,)
            )
            seen = set()
            for delivery in message.deliveries:
                # One row per recipient: a repeated recipient would break the
                # primary key and fail everyone else's messages in the batch.
                if delivery.recipient_key in seen:
                    continue
                seen.add(delivery.recipient_key)
                delivery_rows.append(
                    (
                        message.id,
                        delivery.recipient_key,
                        delivery.recipient_kind,
                        message.mesh_id,
                        delivery.member_id,
                        delivery.group_name,
                        message.priority,
                        seq,
                        # Stored leased when the broker pushes it at once
                        # (see NewDelivery): no claim may hand it on meanwhile.
                        "leased" if delivery.lease_session else "queued",
                        1 if delivery.lease_session else 0,
                        message.expires_at,
                        delivery.lease_session,
                        delivery.lease_until if delivery.lease_session else None,
                    )
                )
            if message.client_id is not None:
                key_rows.append(
                    (
                        message.sender_member_id,
                        message.client_id,
                        message.id,
                        message.expires_at,
                    )
                )
        # In-batch retries resolve to their first copy's result.
        for index, message in enumerate(messages):
            result = results[index]
            if isinstance(result, int):
                results[index] = attr.evolve(results[result], duplicate=True)

        if message_rows:
            yield InsertRows("messages", MESSAGE_COLUMNS, message_rows)
        if delivery_rows:
            yield InsertRows("deliveries", DELIVERY_COLUMNS, delivery_rows)
        if key_rows:
            # An expired key for the same pair is replaced by the new one.
            yield InsertRows(
                "send_keys",
                SEND_KEY_COLUMNS,
                key_rows,
                "ON CONFLICT (sender_member_id, client_id) DO UPDATE SET"
                " message_id = excluded.message_id,"
                " expires_at = excluded.expires_at",
            )
        if audit:
            yield from self._append_audit(audit)
        return results

    def write_batch(self, batch):
        return self._transact(self._write_batch, batch)

    def _write_batch(self, batch):
        if batch.opens:
            yield from self._open_sessions(list(batch.opens))
        results = []
        if batch.messages or batch.audit:
            results = yield from self._enqueue(list(batch.messages), list(batch.audit))
        if batch.updates:
            yield from self._update_sessions(list(batch.updates))
        if batch.acks:
            yield from self._ack_deliveries(list(batch.acks), batch.now)
        if batch.releases:
            yield from self._release_leases(list(batch.releases))
        closes = {}
        for presence_id, when in batch.closes:
            closes.setdefault(when, []).append(presence_id)
        for when, presence_ids in closes.items():
            yield from self._close_sessions(presence_ids, when)
        return results

    def claim_deliveries(
        self,
        member_id,
        session_pubkey,
        presence_id,
        groups,
        priorities,
        now,
        lease_ms,
        limit,
    ):
        priorities = list(priorities)
        if not priorities or limit <= 0:
            return defer.succeed([])
        return self._transact(
            self._claim,
            member_id,
            session_pubkey,
            presence_id,
            list(groups),
            priorities,
            now,
            lease_ms,
            limit,
        )

    def ack_deliveries(self, acks, now):
        return self._transact(self._ack_deliveries, list(acks), now)

    def _ack_deliveries(self, acks, now):
        confirmed = 0
        for chunk in chunks(set(acks)):
            message_ids = sorted({message_id for message_id, _ in chunk})
            # message_id IN (...) lets the primary key find the rows.
            confirmed += yield Execute(
                "UPDATE deliveries SET state = 'delivered', acked_at = %%s,"
                " lease_until = NULL"
                " WHERE message_id IN (%s)"
                " AND (message_id, recipient_key) IN (VALUES %s)"
                " AND state IN ('queued', 'leased')"
                % (placeholders(len(message_ids)), placeholders(len(chunk), 2)),
                (now,) + tuple(message_ids) + flatten(chunk),
            )
        return confirmed

    def release_leases(self, presence_ids):
        return self._transact(self._release_leases, list(presence_ids))

    def _release_leases(self, presence_ids):
        released = 0
        for chunk in chunks(set(presence_ids)):
            released += yield Execute(
                "UPDATE deliveries SET state = 'queued', lease_session = NULL,"
                " lease_until = NULL"
                " WHERE state = 'leased' AND lease_session IN (%s)"
                % (placeholders(len(chunk)),),
                tuple(chunk),
            )
        return released

    def get_message(self, message_id):
        return self._transact(self._get_message, message_id, write=False)

    def _get_message(self, message_id):
        columns = MESSAGE_COLUMNS[:-1]
        rows = yield Query(
            "SELECT %s FROM messages WHERE id = %%s" % (", ".join(columns),),
            (message_id,),
        )
        if not rows:
            return None
        return NewMessage(**dict(zip(columns, rows[0])))

    def message_deliveries(self, message_id):
        return self._transact(self._message_deliveries, message_id, write=False)

    def _message_deliveries(self, message_id):
        rows = yield Query(
            "SELECT %s FROM deliveries WHERE message_id = %%s ORDER BY recipient_key"
            % (", ".join(DELIVERY_RECORD_COLUMNS),),
            (message_id,),
        )
        return [DeliveryRecord(*row) for row in rows]

    def expire_deliveries(self, now):
        return self._transact(self._expire_deliveries, now)

    def _expire_deliveries(self, now):
        count = yield Execute(
            "UPDATE deliveries SET state = 'expired', lease_until = NULL"
            " WHERE state IN ('queued', 'leased') AND expires_at <= %s",
            (now,),
        )
        return count

    def delete_messages_before(self, cutoff):
        return self._transact(self._delete_messages_before, cutoff)

    def _delete_messages_before(self, cutoff):
        doomed = (
            "SELECT id FROM messages WHERE created_at < %s AND NOT EXISTS"
            " (SELECT 1 FROM deliveries p WHERE p.message_id = messages.id"
            " AND p.state IN ('queued', 'leased'))"
        )
        # Deliveries first and explicitly rather than by ON DELETE CASCADE:
        # the same statements then work whatever the foreign key settings.
        yield Execute(
            "DELETE FROM deliveries WHERE message_id IN (%s)" % (doomed,), (cutoff,)
        )
        count = yield Execute(
            "DELETE FROM messages WHERE id IN (%s)" % (doomed,), (cutoff,)
        )
        yield Execute("DELETE FROM send_keys WHERE expires_at <= %s", (cutoff,))
        return count

    def count_queued(self):
        return self._transact(self._count_queued, write=False)

    def _count_queued(self):
        rows = yield Query(
            "SELECT COUNT(*) FROM deliveries WHERE state IN ('queued', 'leased')"
        )
        return int(rows[0][0])

    # -- audit --------------------------------------------------------------

    def append_audit(self, events):
        return self._transact(self._append_audit, list(events))

    def _append_audit(self, events):
        if not events:
            return []
        mesh_ids = sorted({event.mesh_id for event in events})
        yield from self._lock_chains(mesh_ids)
        tails = {}
        for chunk in chunks(mesh_ids):
            rows = yield Query(
                "SELECT a.mesh_id, a.seq, a.hash FROM audit_log a"
                " WHERE a.mesh_id IN (%s) AND a.seq ="
                " (SELECT MAX(b.seq) FROM audit_log b WHERE b.mesh_id = a.mesh_id)"
                % (placeholders(len(chunk)),),
                tuple(chunk),
            )
            for mesh_id, seq, hash_ in rows:
                tails[mesh_id] = (int(seq), hash_)
        entries = chain_events(events, tails)
        yield InsertRows(
            "audit_log",
            AUDIT_COLUMNS,
            [
                (
                    entry.mesh_id,
                    entry.seq,
                    entry.event_type,
                    entry.actor,
                    canonical_json(entry.payload),
                    entry.prev_hash,
                    entry.hash,
                    entry.created_at,
                )
                for entry in entries
            ],
        )
        return entries

    def audit_entries(self, mesh_id, limit, offset, event_type=None):
        return self._transact(
            self._audit_entries, mesh_id, limit, offset, event_type, write=False
        )

    def _audit_entries(self, mesh_id, limit, offset, event_type):
        where = "mesh_id = %s"
        params = (mesh_id,)
        if event_type is not None:
            where += " AND event_type = %s"
            params += (event_type,)
        rows = yield Query("SELECT COUNT(*) FROM audit_log WHERE " + where, params)
        total = int(rows[0][0])
        rows = yield Query(
            "SELECT %s FROM audit_log WHERE %s ORDER BY seq DESC LIMIT %%s OFFSET %%s"
            % (", ".join(AUDIT_COLUMNS), where),
            params + (limit, offset),
        )
        return ([audit_from_row(row) for row in rows], total)

    def verify_chain(self, mesh_id):
        return self._transact(self._verify_chain, mesh_id, write=False)

    def _verify_chain(self, mesh_id):
        checker = ChainChecker()
        after = 0
        while True:
            rows = yield Query(
                "SELECT %s FROM audit_log WHERE mesh_id = %%s AND seq > %%s"
                " ORDER BY seq LIMIT %%s" % (", ".join(AUDIT_COLUMNS),),
                (mesh_id, after, VERIFY_PAGE),
            )
            for row in rows:
                checker.feed(audit_from_row(row))
            if len(rows) < VERIFY_PAGE:
                return checker.result()
            after = int(rows[-1][1])


def chain_events(events, tails):
    """
    Chain C{events} onto C{tails} (C{{mesh_id: (seq, hash)}}, updated in
    place), returning their L{AuditEntry}s.
    """
    entries = []
    for event in events:
        seq, prev_hash = tails.get(event.mesh_id, (0, GENESIS))
        # The stored payload is its canonical JSON; hand back what reading
        # the row would give, so fresh and re-read entries compare equal.
        text = canonical_json(event.payload)
        payload = json.loads(text)
        digest = chain_hash_text(
            prev_hash,
            event.mesh_id,
            event.event_type,
            event.actor,
            text,
            event.created_at,
        )
        entries.append(
            AuditEntry(
                mesh_id=event.mesh_id,
                seq=seq + 1,
                event_type=event.event_type,
                actor=event.actor,
                payload=payload,
                prev_hash=prev_hash,
                hash=digest,
                created_at=event.created_at,
            )
        )
        tails[event.mesh_id] = (seq + 1, digest)
    return entries


class ChainChecker:
    """
    Walk one mesh's audit entries in C{seq} order, recomputing each hash.
    The result counts every entry; C{broken_at} is the C{seq} of the first
    one whose link or hash does not match.
    """

    def __init__(self):
        self.prev_hash = GENESIS
        self.entries = 0
        self.broken_at = None

    def feed(self, entry: AuditEntry) -> None:
        """
        Count the next entry and check it, until the chain is found broken.
        """
        self.entries += 1
        if self.broken_at is not None:
            return
        expected = chain_hash(
            self.prev_hash,
            entry.mesh_id,
            entry.event_type,
            entry.actor,
            entry.payload,
            entry.created_at,
        )
        if entry.prev_hash != self.prev_hash or entry.hash != expected:
            self.broken_at = entry.seq
            return
        self.prev_hash = entry.hash

    def result(self) -> ChainVerification:
        return ChainVerification(
            valid=self.broken_at is None,
            entries=self.entries,
            broken_at=self.broken_at,
        )
