"""
The SQL of both stores, written once.

Every store interaction is a I{named transaction}: L{SQLStore.run_interaction}
C{(desc, txn_function, *args)} runs the generator C{txn_function(*args)}
(see L{claudemesh.store.sql.operations}) inside one database transaction,
times it under the label C{desc}, and maps the database's errors onto the
store's. The transaction functions live with their domain:

  - L{claudemesh.store.sql.meshes}: meshes, members, invites, and the
    membership actions (join, roles, ownership, ban, unban, leave);
  - L{claudemesh.store.sql.sessions}: the session mirror and lease releases;
  - L{claudemesh.store.sql.messages}: messages, deliveries, claims, acks and
    retention;
  - L{claudemesh.store.sql.audit}: the audit chain;
  - L{claudemesh.store.sql.meshkeys}: mesh key epochs and their sealed
    copies (issue 17);
  - L{claudemesh.store.sql.nodes}: the nodes of a cluster, their
    heartbeats, and closing what a dead node left (issue 15).

What differs between SQLite and Postgres is small and lives in a I{dialect}
object (L{Dialect}): how message sequence numbers are taken, how the audit
chains and the claim are made safe under concurrency, how many session rows
are updated in one statement, and the schema upgrade's prologue. How a
transaction is run (a thread and one connection, or txpostgres) is the
engine's business: L{claudemesh.store.sqlite}, L{claudemesh.store.postgres}.
"""

import time

from zope.interface import implementer

from claudemesh.store.interface import IStore
from claudemesh.store.records import BatchOutcome
from claudemesh.store.sql.audit import AuditStore
from claudemesh.store.sql.meshes import MeshStore
from claudemesh.store.sql.meshkeys import MeshKeyStore
from claudemesh.store.sql.messages import MessageStore, ack_deliveries_txn, enqueue_txn
from claudemesh.store.sql.nodes import NodeStore
from claudemesh.store.sql.operations import Execute
from claudemesh.store.sql.sessions import (
    SessionStore,
    close_sessions_txn,
    open_sessions_txn,
    release_leases_txn,
    update_sessions_txn,
)


class Dialect:
    """
    The portable half of a dialect; a backend's dialect overrides what its
    database does better or must do differently. Every method is a
    generator of SQL operations.

    @ivar row_lock: appended to a C{SELECT} whose rows must stay as read
        until the transaction ends (Postgres: C{FOR UPDATE}; SQLite's one
        connection serialises every transaction anyway).
    """

    row_lock = ""

    def try_lock(self, name):
        """
        Take the lock C{name} until the transaction ends, if nobody holds
        it: C{True} when taken. One process alone (SQLite) always takes it.
        """
        return True
        yield  # a generator of no operations

    def notify_txn(self, notices):
        """
        Send C{notices} (L{claudemesh.store.records.Notice}s) to the other
        nodes when this transaction commits. Nothing to do for one process
        (SQLite): the broker's own backplane hands them on after the commit.
        """
        return
        yield

    def update_session_rows(self, columns, rows):
        """
        Apply C{rows} (values of C{columns}, then the presence id) to the
        sessions table: one UPDATE per row.
        """
        sql = "UPDATE sessions SET %s WHERE presence_id = %%s" % (
            ", ".join("%s = %%s" % (column,) for column in columns),
        )
        for row in rows:
            yield Execute(sql, row)

    def next_seqs(self, count):
        """
        C{count} new message sequence numbers, in commit order.
        """
        raise NotImplementedError()

    def lock_chains(self, mesh_ids):
        """
        Serialise appends to these meshes' audit chains until the
        transaction ends.
        """
        raise NotImplementedError()

    def claim_txn(self, request):
        """
        Lease what a L{ClaimRequest} may take; fires with its
        L{ClaimedDelivery}s in C{seq} order.
        """
        raise NotImplementedError()


@implementer(IStore)
class SQLStore(MeshStore, SessionStore, MessageStore, AuditStore, MeshKeyStore, NodeStore):
    """
    The L{IStore} methods for an engine that provides C{dialect} and
    C{_run_transaction(txn_function, args, write)} (a L{Deferred} of the
    function's value, the store's errors mapped).

    @ivar on_transaction: C{None}, or a callable given C{(desc, seconds)}
        after each transaction (the broker's store-latency metric).
    """

    on_transaction = None

    def run_interaction(self, desc, txn_function, *args, write=True):
        """
        Run C{txn_function(*args)} as the transaction named C{desc}.
        """
        observe = self.on_transaction
        if observe is None:
            return self._run_transaction(txn_function, args, write)
        started = time.perf_counter()

        def timed(result):
            observe(desc, time.perf_counter() - started)
            return result

        return self._run_transaction(txn_function, args, write).addBoth(timed)

    def notify(self, notices):
        """
        Send C{notices} on their own, in a transaction of their own (for a
        change another transaction already committed).
        """
        return self.run_interaction("notify", self.dialect.notify_txn, list(notices))

    def write_batch(self, batch):
        return self.run_interaction("write_batch", self._write_batch_txn, batch)

    def _write_batch_txn(self, batch):
        dialect = self.dialect
        if batch.opens:
            yield from open_sessions_txn(list(batch.opens))
        results = []
        if batch.messages or batch.audit:
            results = yield from enqueue_txn(dialect, list(batch.messages), list(batch.audit))
        if batch.updates:
            yield from update_sessions_txn(dialect, list(batch.updates))
        if batch.acks:
            yield from ack_deliveries_txn(list(batch.acks), batch.now)
        if batch.releases:
            yield from release_leases_txn(list(batch.releases))
        closes = {}
        for presence_id, when in batch.closes:
            closes.setdefault(when, []).append(presence_id)
        for when, presence_ids in closes.items():
            yield from close_sessions_txn(presence_ids, when)
        claimed = []
        for request in batch.claims:
            rows = []
            if request.priorities and request.limit > 0:
                rows = yield from dialect.claim_txn(request)
            claimed.append(rows)
        if batch.notices:
            yield from dialect.notify_txn(list(batch.notices))
        return BatchOutcome(results, claimed)
