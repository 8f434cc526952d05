"""
The session mirror: one row per hello, kept up to date from the broker's
memory (status, summary, groups) so an operator can query it, and closed
when the session ends (its leases going back to the queue in the same
transaction); and the binding of each session key to the one (mesh, member)
whose hello first proved it.
"""

import json

import attr

from claudemesh.store.records import SessionKeyBinding, SessionRecord
from claudemesh.store.sql.operations import Execute, InsertRows, Query, chunks, placeholders

SESSION_COLUMNS = tuple(f.name for f in attr.fields(SessionRecord))
# The boolean columns, stored as 0/1.
_FLAG_COLUMNS = ("receive", "watch", "presence")
SESSION_KEY_COLUMNS = tuple(f.name for f in attr.fields(SessionKeyBinding))

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


def session_row(session: SessionRecord) -> tuple:
    values = attr.astuple(session, recurse=False)
    row = list(values)
    row[SESSION_COLUMNS.index("groups")] = json.dumps(list(session.groups))
    for flag in _FLAG_COLUMNS:
        row[SESSION_COLUMNS.index(flag)] = 1 if getattr(session, flag) else 0
    return tuple(row)


def session_from_row(row) -> SessionRecord:
    values = dict(zip(SESSION_COLUMNS, row))
    values["groups"] = tuple(json.loads(values["groups"]))
    for flag in _FLAG_COLUMNS:
        values[flag] = bool(values[flag])
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


def open_sessions_txn(sessions):
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


def update_sessions_txn(dialect, updates):
    merged = merge_session_updates(updates)
    # Sessions changing the same columns share one statement.
    groups = {}
    for presence_id, changes in merged.items():
        columns = tuple(sorted(changes))
        if columns:
            row = tuple(session_column_value(column, changes[column]) for column in columns)
            groups.setdefault(columns, []).append(row + (presence_id,))
    for columns, rows in groups.items():
        yield from dialect.update_session_rows(columns, rows)


def release_leases_txn(presence_ids):
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


def close_sessions_txn(presence_ids, disconnected_at):
    closed = 0
    for chunk in chunks(set(presence_ids)):
        closed += yield Execute(
            "UPDATE sessions SET disconnected_at = %%s"
            " WHERE presence_id IN (%s) AND disconnected_at IS NULL"
            % (placeholders(len(chunk)),),
            (disconnected_at,) + tuple(chunk),
        )
    yield from release_leases_txn(presence_ids)
    return closed


def bind_session_key_txn(binding):
    # The primary key makes the first binding win, on one node or many: a
    # concurrent second insert does nothing and reads the winner.
    yield InsertRows(
        "session_keys",
        SESSION_KEY_COLUMNS,
        [attr.astuple(binding)],
        "ON CONFLICT (session_pubkey) DO NOTHING",
    )
    rows = yield Query(
        "SELECT %s FROM session_keys WHERE session_pubkey = %%s"
        % (", ".join(SESSION_KEY_COLUMNS),),
        (binding.session_pubkey,),
    )
    return SessionKeyBinding(*rows[0])


class SessionStore:
    """
    The session half of L{claudemesh.store.sql.SQLStore}.
    """

    def open_sessions(self, sessions):
        return self.run_interaction("open_sessions", open_sessions_txn, list(sessions))

    def update_sessions(self, updates):
        return self.run_interaction(
            "update_sessions", update_sessions_txn, self.dialect, list(updates))

    def close_sessions(self, presence_ids, disconnected_at):
        return self.run_interaction(
            "close_sessions", close_sessions_txn, list(presence_ids), disconnected_at)

    def close_all_sessions(self, disconnected_at):
        return self.run_interaction(
            "close_all_sessions", self._close_all_sessions_txn, disconnected_at)

    def _close_all_sessions_txn(self, disconnected_at):
        closed = yield Execute(
            "UPDATE sessions SET disconnected_at = %s WHERE disconnected_at IS NULL",
            (disconnected_at,),
        )
        yield Execute(
            "UPDATE deliveries SET state = 'queued', lease_session = NULL,"
            " lease_until = NULL WHERE state = 'leased'"
        )
        return closed

    def release_leases(self, presence_ids):
        return self.run_interaction("release_leases", release_leases_txn, list(presence_ids))

    def list_open_sessions(self, mesh_id):
        return self.run_interaction(
            "list_open_sessions", self._list_open_sessions_txn, mesh_id, write=False)

    def _list_open_sessions_txn(self, mesh_id):
        rows = yield Query(
            "SELECT %s FROM sessions WHERE mesh_id = %%s AND disconnected_at IS NULL"
            " ORDER BY connected_at, presence_id" % (", ".join(SESSION_COLUMNS),),
            (mesh_id,),
        )
        return [session_from_row(row) for row in rows]

    def find_open_sessions(self, mesh_id, member_id, session_id):
        return self.run_interaction(
            "find_open_sessions", self._find_open_sessions_txn, mesh_id, member_id, session_id,
            write=False)

    def _find_open_sessions_txn(self, mesh_id, member_id, session_id):
        rows = yield Query(
            "SELECT %s FROM sessions WHERE mesh_id = %%s AND member_id = %%s"
            " AND session_id = %%s AND disconnected_at IS NULL" % (", ".join(SESSION_COLUMNS),),
            (mesh_id, member_id, session_id),
        )
        return [session_from_row(row) for row in rows]

    def get_session(self, presence_id):
        return self.run_interaction(
            "get_session", self._get_session_txn, presence_id, write=False)

    def _get_session_txn(self, presence_id):
        rows = yield Query(
            "SELECT %s FROM sessions WHERE presence_id = %%s" % (", ".join(SESSION_COLUMNS),),
            (presence_id,),
        )
        return session_from_row(rows[0]) if rows else None

    def bind_session_key(self, binding):
        return self.run_interaction("bind_session_key", bind_session_key_txn, binding)
