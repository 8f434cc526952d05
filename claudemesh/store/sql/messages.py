"""
Messages and their deliveries: storing a batch of sends (with their
idempotency keys), leasing deliveries to a session (the claim), confirming
them, and the retention sweep.

A message has one delivery per recipient: a I{member} delivery, which any
live session of that member may lease, or a I{session} delivery, which only
the session with that key may. Both kinds are always scoped by the
recipient member (and so by its mesh): a claim or an acknowledgement never
reaches another member's rows, whatever key it names.
"""

import attr
from twisted.internet import defer

from claudemesh.store.records import ClaimedDelivery, DeliveryRecord, EnqueueResult, NewMessage
from claudemesh.store.sql.audit import append_audit_txn
from claudemesh.store.sql.operations import (
    Execute,
    InsertRows,
    Query,
    chunks,
    flatten,
    placeholders,
)

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
    "key_epoch",
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

CLAIMED_SELECT = (
    "{d}.message_id, {d}.recipient_key, {d}.recipient_kind, {d}.mesh_id, "
    "{d}.member_id, m.sender_pubkey, m.sender_member_pubkey, m.target_spec, "
    "{d}.priority, m.nonce, m.ciphertext, m.created_at, {d}.seq, {d}.attempts,"
    " m.key_epoch"
)
_ATTEMPTS = [f.name for f in attr.fields(ClaimedDelivery)].index("attempts")


def claimable_where(request, alias="d"):
    """
    The C{WHERE} clause (and its parameters) selecting the deliveries the
    session of a L{ClaimRequest} may lease now: its member's, of no group or
    of one of its groups (unless it is watching), and those addressed to its
    own session key.
    """
    d = alias
    kinds, kind_params = [], []
    if request.member_deliveries:
        groups = list(request.groups)
        if groups:
            group_sql = "(%s.group_name IS NULL OR %s.group_name IN (%s))" % (
                d, d, placeholders(len(groups)))
            kind_params.extend(groups)
        else:
            group_sql = "%s.group_name IS NULL" % (d,)
        kinds.append("(%s.recipient_kind = 'member' AND %s)" % (d, group_sql))
    if request.session_pubkey:
        kinds.append("(%s.recipient_kind = 'session' AND %s.recipient_key = %%s)" % (d, d))
        kind_params.append(request.session_pubkey)
    which = "(%s)" % (" OR ".join(kinds) or "1 = 0",)
    priorities = list(request.priorities)
    sql = (
        # member_id and state first: the (member_id, state, seq) index then
        # finds both kinds and skips delivered history.
        "%s.member_id = %%s AND %s.state IN ('queued', 'leased') AND %s"
        " AND %s.priority IN (%s) AND %s.expires_at > %%s"
        " AND (%s.state = 'queued' OR %s.lease_until <= %%s)"
        % (d, d, which, d, placeholders(len(priorities)), d, d, d)
    )
    params = [request.member_id] + kind_params + priorities + [request.now, request.now]
    return sql, tuple(params)


def claimed_from_row(row, attempts_delta=0) -> ClaimedDelivery:
    values = list(row)
    values[_ATTEMPTS] = int(values[_ATTEMPTS]) + attempts_delta
    return ClaimedDelivery(*values)


def enqueue_txn(dialect, messages, audit):
    """
    Store C{messages} with their deliveries and send keys, and C{audit}
    (see L{IStore.enqueue}).
    """
    keys = sorted({
        (message.sender_member_id, message.client_id)
        for message in messages
        if message.client_id is not None
    })
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
                    message_id, int(seq) if seq is not None else 0, True)
                continue
            first_in_batch[key] = index
        fresh.append(index)

    seqs = yield from dialect.next_seqs(len(fresh))
    message_rows = []
    delivery_rows = []
    key_rows = []
    for index, seq in zip(fresh, seqs):
        message = messages[index]
        results[index] = EnqueueResult(message.id, seq)
        message_rows.append(tuple(getattr(message, c) for c in MESSAGE_COLUMNS[:-1]) + (seq,))
        seen = set()
        for delivery in message.deliveries:
            # One row per recipient: a repeated recipient would break the
            # primary key and fail everyone else's messages in the batch.
            if delivery.recipient_key in seen:
                continue
            seen.add(delivery.recipient_key)
            leased = bool(delivery.lease_session)
            delivery_rows.append((
                message.id,
                delivery.recipient_key,
                delivery.recipient_kind,
                message.mesh_id,
                delivery.member_id,
                delivery.group_name,
                message.priority,
                seq,
                # Stored leased when the broker pushes it at once (see
                # NewDelivery): no claim may hand it on meanwhile.
                "leased" if leased else "queued",
                1 if leased else 0,
                message.expires_at,
                delivery.lease_session,
                delivery.lease_until if leased else None,
            ))
        if message.client_id is not None:
            key_rows.append((message.sender_member_id, message.client_id, message.id,
                             message.expires_at))
    # In-batch retries resolve to their first copy's result.
    for index in range(len(messages)):
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
        yield from append_audit_txn(dialect, audit)
    return results


def ack_deliveries_txn(acks, now):
    """
    Confirm C{[(message_id, member_id, recipient_key)]}: a delivery is only
    confirmed by (a session of) the member it belongs to.
    """
    confirmed = 0
    for chunk in chunks(set(acks)):
        message_ids = sorted({message_id for message_id, _, _ in chunk})
        # message_id IN (...) lets the primary key find the rows.
        confirmed += yield Execute(
            "UPDATE deliveries SET state = 'delivered', acked_at = %%s,"
            " lease_until = NULL"
            " WHERE message_id IN (%s)"
            " AND (message_id, member_id, recipient_key) IN (VALUES %s)"
            " AND state IN ('queued', 'leased')"
            % (placeholders(len(message_ids)), placeholders(len(chunk), 3)),
            (now,) + tuple(message_ids) + flatten(chunk),
        )
    return confirmed


class MessageStore:
    """
    The message half of L{claudemesh.store.sql.SQLStore}.
    """

    def enqueue(self, messages, audit=()):
        return self.run_interaction(
            "enqueue", enqueue_txn, self.dialect, list(messages), list(audit))

    def claim_deliveries(self, request):
        if not request.priorities or request.limit <= 0:
            return defer.succeed([])
        return self.run_interaction("claim_deliveries", self.dialect.claim_txn, request)

    def ack_deliveries(self, acks, now):
        return self.run_interaction("ack_deliveries", ack_deliveries_txn, list(acks), now)

    def get_message(self, message_id):
        return self.run_interaction(
            "get_message", self._get_message_txn, message_id, write=False)

    def _get_message_txn(self, message_id):
        columns = MESSAGE_COLUMNS[:-1]
        rows = yield Query(
            "SELECT %s FROM messages WHERE id = %%s" % (", ".join(columns),), (message_id,))
        if not rows:
            return None
        return NewMessage(**dict(zip(columns, rows[0])))

    def message_deliveries(self, message_id):
        return self.run_interaction(
            "message_deliveries", self._message_deliveries_txn, message_id, write=False)

    def _message_deliveries_txn(self, message_id):
        rows = yield Query(
            "SELECT %s FROM deliveries WHERE message_id = %%s ORDER BY recipient_key"
            % (", ".join(DELIVERY_RECORD_COLUMNS),),
            (message_id,),
        )
        return [DeliveryRecord(*row) for row in rows]

    def expire_deliveries(self, now, limit=None):
        return self.run_interaction(
            "expire_deliveries", self._expire_deliveries_txn, now, limit)

    def _expire_deliveries_txn(self, now, limit):
        due = "state IN ('queued', 'leased') AND expires_at <= %s"
        if limit is None:
            count = yield Execute(
                "UPDATE deliveries SET state = 'expired', lease_until = NULL WHERE " + due,
                (now,))
            return count
        # At most `limit` rows: the (expires_at) index finds them.
        rows = yield Query(
            "SELECT message_id, recipient_key FROM deliveries WHERE %s"
            " ORDER BY expires_at LIMIT %%s" % (due,), (now, limit))
        count = 0
        for chunk in chunks(rows):
            message_ids = sorted({message_id for message_id, _ in chunk})
            count += yield Execute(
                "UPDATE deliveries SET state = 'expired', lease_until = NULL"
                " WHERE message_id IN (%s) AND (message_id, recipient_key) IN (VALUES %s)"
                " AND %s" % (placeholders(len(message_ids)), placeholders(len(chunk), 2), due),
                tuple(message_ids) + flatten(chunk) + (now,))
        return count

    def delete_messages_before(self, cutoff, limit=None):
        return self.run_interaction(
            "delete_messages_before", self._delete_messages_before_txn, cutoff, limit)

    def _delete_messages_before_txn(self, cutoff, limit):
        doomed = (
            "SELECT id FROM messages WHERE created_at < %s AND NOT EXISTS"
            " (SELECT 1 FROM deliveries p WHERE p.message_id = messages.id"
            " AND p.state IN ('queued', 'leased'))"
        )
        if limit is None:
            # Deliveries first and explicitly rather than by ON DELETE
            # CASCADE: the same statements then work whatever the foreign
            # key settings.
            yield Execute("DELETE FROM deliveries WHERE message_id IN (%s)" % (doomed,),
                          (cutoff,))
            count = yield Execute("DELETE FROM messages WHERE id IN (%s)" % (doomed,),
                                  (cutoff,))
            return count
        # The oldest `limit` of them (the messages_created index), by id.
        rows = yield Query(doomed + " ORDER BY created_at LIMIT %s", (cutoff, limit))
        count = 0
        for chunk in chunks([row[0] for row in rows]):
            marks = placeholders(len(chunk))
            yield Execute("DELETE FROM deliveries WHERE message_id IN (%s)" % (marks,),
                          tuple(chunk))
            count += yield Execute("DELETE FROM messages WHERE id IN (%s)" % (marks,),
                                   tuple(chunk))
        return count

    def delete_send_keys_before(self, cutoff, limit=None):
        return self.run_interaction(
            "delete_send_keys_before", self._delete_send_keys_before_txn, cutoff, limit)

    def _delete_send_keys_before_txn(self, cutoff, limit):
        if limit is None:
            count = yield Execute("DELETE FROM send_keys WHERE expires_at <= %s", (cutoff,))
            return count
        count = yield Execute(
            "DELETE FROM send_keys WHERE (sender_member_id, client_id) IN"
            " (SELECT sender_member_id, client_id FROM send_keys WHERE expires_at <= %s"
            " LIMIT %s)", (cutoff, limit))
        return count

    def count_queued(self):
        return self.run_interaction("count_queued", self._count_queued_txn, write=False)

    def _count_queued_txn(self):
        rows = yield Query("SELECT COUNT(*) FROM deliveries WHERE state IN ('queued', 'leased')")
        return int(rows[0][0])
