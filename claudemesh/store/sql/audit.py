"""
The audit log: a per-mesh sha256 chain (L{claudemesh.audit}), appended inside
the transaction of whatever the entry records, read newest first, verified
row by row.
"""

import json

from claudemesh.audit import GENESIS, canonical_json, chain_hash, chain_hash_text
from claudemesh.store.records import AuditEntry, ChainVerification
from claudemesh.store.sql.operations import InsertRows, Query, chunks, placeholders

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

# How many audit rows verify_chain reads per query.
VERIFY_PAGE = 1000


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


def append_audit_txn(dialect, events):
    """
    Chain C{events} onto their meshes' chains and insert them; fires with
    their L{AuditEntry}s. Runs inside the caller's transaction, so an entry
    commits exactly when what it records does.
    """
    if not events:
        return []
    mesh_ids = sorted({event.mesh_id for event in events})
    yield from dialect.lock_chains(mesh_ids)
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


class AuditStore:
    """
    The audit half of L{claudemesh.store.sql.SQLStore}.
    """

    def append_audit(self, events):
        return self.run_interaction(
            "append_audit", append_audit_txn, self.dialect, list(events))

    def audit_entries(self, mesh_id, limit, offset, event_type=None):
        return self.run_interaction(
            "audit_entries", self._audit_entries_txn, mesh_id, limit, offset, event_type,
            write=False)

    def _audit_entries_txn(self, mesh_id, limit, offset, event_type):
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
        return self.run_interaction(
            "verify_chain", self._verify_chain_txn, mesh_id, write=False)

    def _verify_chain_txn(self, mesh_id):
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
