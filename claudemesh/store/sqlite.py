"""
The embedded default store: SQLite through L{twisted.enterprise.adbapi}.

One connection (C{cp_min=cp_max=1}) in one thread serialises every
transaction, which is what makes the claim and the invite consumption atomic
here; writes take the database lock up front (C{BEGIN IMMEDIATE}) so another
process opening the same file waits (C{busy_timeout}) instead of failing
half-way through a transaction.

Message sequence numbers come from a counter held in memory, started at
C{MAX(seq) + 1} when the store opens. They only ever grow while the process
runs and across restarts as long as the newest message is kept; pruning every
message and restarting may hand out a number again, which is harmless because
nothing pending can carry the old one.

The same SQL also runs I{inline}: L{SQLiteStore.inline} keeps one connection
in the calling thread and answers every call with an already-fired
L{Deferred}. The broker core's unit tests use it (on C{:memory:}), so they
need neither threads nor a reactor and still run the real claim, dedupe and
audit SQL rather than a copy of its semantics.
"""

import fcntl
import itertools
import os
import sqlite3

from twisted.enterprise import adbapi
from twisted.internet import defer

from claudemesh.store import schema
from claudemesh.store.interface import DatabaseInUse, DuplicateKey, StoreUnavailable
from claudemesh.store.sql import Dialect, SQLStore
from claudemesh.store.sql.messages import CLAIMED_SELECT, claimable_where, claimed_from_row
from claudemesh.store.sql.operations import (
    Execute,
    InsertRows,
    Query,
    flatten,
    placeholders,
    run_inline,
)

# The page cache of the connection, in KiB. SQLite's default (2 MiB) holds
# the upper levels of the indexes of a small database only: with a million
# messages, every insert under a random id and every acknowledgement read
# its pages back from the OS (bench growth: -4 to -10 % CPU per message and
# +16 to +43 % msg/s on that database with 64 MiB). Filled only as used.
CACHE_KIB = 65536

# Rows per multi-row INSERT (L{_insert_rows}).
INSERT_ROWS = 250

# How long a statement waits for another process's write lock, in ms.
BUSY_TIMEOUT_MS = 5000

# sqlite3.OperationalError texts that mean "try again later", not a bug.
_UNAVAILABLE = ("locked", "busy", "disk i/o", "unable to open", "readonly")


def _qmark(sql: str) -> str:
    return sql.replace("%s", "?")


def _execute(cursor, operation):
    if isinstance(operation, Query):
        cursor.execute(_qmark(operation.sql), operation.params)
        return cursor.fetchall()
    if isinstance(operation, Execute):
        cursor.execute(_qmark(operation.sql), operation.params)
        return cursor.rowcount
    if isinstance(operation, InsertRows):
        _insert_rows(cursor, operation)
        return None
    raise TypeError("not an SQL operation: %r" % (operation,))


def _insert_rows(cursor, operation):
    """
    Insert the rows of an L{InsertRows} as multi-row C{INSERT}s of at most
    L{INSERT_ROWS} rows (and as many bound values as SQLite allows).

    Not C{executemany}: it runs one statement per row, and C{sqlite3}
    releases the GIL around each, so a batch of a thousand messages handed
    the GIL to the reactor and waited to get it back thousands of times;
    one statement per few hundred rows binds them all, then releases it
    once.
    """
    rows = operation.rows
    if not rows:
        return
    width = len(operation.columns)
    limit = cursor.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    size = max(1, min(INSERT_ROWS, limit // width))
    one_row = "(" + ", ".join(["?"] * width) + ")"
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        sql = operation.statement(", ".join([one_row] * len(chunk)))
        cursor.execute(_qmark(sql), [value for row in chunk for value in row])


def _configure(connection):
    # Runs once, in the pool's thread, on the pool's only connection.
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout = %d" % (BUSY_TIMEOUT_MS,))
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA cache_size = %d" % (-CACHE_KIB,))
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


class _PooledConnection:
    """
    The production runner: adbapi's pool of one connection, in its thread.
    """

    def __init__(self, path, reactor):
        # isolation_level=None: sqlite3 must not open transactions behind our
        # back (it would not for DDL, leaving a half-created schema after a
        # failure); SQLiteStore._run issues BEGIN itself and adbapi commits.
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_reactor=reactor,
            cp_openfun=_configure,
        )

    def run(self, function, *args):
        return self._pool.runWithConnection(function, *args)

    def close(self):
        self._pool.close()


class _InlineConnection:
    """
    One connection used in the calling thread: every call runs now and
    returns an already-fired L{Deferred}, committed or rolled back as
    adbapi's C{runWithConnection} would.
    """

    def __init__(self, path):
        self._connection = sqlite3.connect(path, isolation_level=None)
        _configure(self._connection)

    def run(self, function, *args):
        connection = self._connection
        try:
            result = function(connection, *args)
        except BaseException:
            connection.rollback()
            return defer.fail()
        connection.commit()
        return defer.succeed(result)

    def close(self):
        self._connection.close()


class SQLiteStore(SQLStore):
    """
    An L{IStore} in one SQLite file (or C{:memory:}).
    """

    kind = "sqlite"

    def __init__(self, path, reactor):
        self.path = path
        self._reactor = reactor
        self._connection = None
        self._process_lock = None
        self.dialect = SQLiteDialect()

    @classmethod
    def inline(cls, path=":memory:"):
        """
        A store that runs every transaction at once in the calling thread
        (see the module docstring): for unit tests.
        """
        return cls(path, None)

    def __repr__(self):
        return "<SQLiteStore %s>" % (self.path,)

    def open(self):
        if self._reactor is None:
            self._connection = _InlineConnection(self.path)
        else:
            self._connection = _PooledConnection(self.path, self._reactor)
        d = self._run_transaction(self._open_txn, (), True)

        def failed(failure):
            self._close_connection()
            return failure

        return d.addErrback(failed)

    def _open_txn(self):
        yield from schema.migrate(self.dialect)
        rows = yield Query("SELECT COALESCE(MAX(seq), 0) FROM messages")
        self.dialect.seqs = itertools.count(int(rows[0][0]) + 1)

    def close(self):
        self._close_connection()
        self.release_process()
        return defer.succeed(None)

    def claim_process(self):
        """
        Make this process the only broker on this database file (issue 15:
        SQLite serves one process; several share a Postgres database). An
        advisory lock on C{<path>.lock}, held until L{close}; the kernel
        drops it when the process dies, however it dies.

        @raise DatabaseInUse: another process holds it, naming its pid.
        """
        if self.path == ":memory:":
            return
        lock = open(self.path + ".lock", "a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip()[:20] or "unknown"
            lock.close()
            raise DatabaseInUse(
                "another broker process (pid %s) uses the SQLite database %s; SQLite serves "
                "one process: to run several brokers on the same data use PostgreSQL "
                "(DATABASE_URL=postgresql://user@host/dbname)" % (holder, self.path)) from None
        lock.seek(0)
        lock.truncate()
        lock.write("%d\n" % (os.getpid(),))
        lock.flush()
        self._process_lock = lock

    def release_process(self):
        lock, self._process_lock = self._process_lock, None
        if lock is not None:
            lock.close()

    def _close_connection(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def ping(self):
        return self.run_interaction("ping", self._ping_txn, write=False)

    def _ping_txn(self):
        yield Query("SELECT 1")

    # -- running transactions -----------------------------------------------

    def _run_transaction(self, operation, args, write):
        if self._connection is None:
            return defer.fail(StoreUnavailable("%r is not open" % (self,)))
        d = self._connection.run(self._run, operation, args, write)
        return d.addErrback(self._map_failure)

    @staticmethod
    def _run(connection, operation, args, write):
        cursor = connection.cursor()
        # IMMEDIATE takes the write lock now: a deferred transaction that
        # reads, then writes, can fail with SQLITE_BUSY half-way when another
        # process wrote in between.
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            return run_inline(operation(*args), lambda step: _execute(cursor, step))
        finally:
            cursor.close()

    def _map_failure(self, failure):
        error = failure.value
        if isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error):
            raise DuplicateKey(str(error)) from error
        if isinstance(error, sqlite3.OperationalError) and any(
            text in str(error).lower() for text in _UNAVAILABLE
        ):
            raise StoreUnavailable("%s: %s" % (self.path, error)) from error
        return failure



class SQLiteDialect(Dialect):
    """
    What SQLite does its own way. The single connection serialises every
    transaction, so sequence numbers come from a counter in memory and the
    audit chains need no lock.
    """

    def __init__(self):
        self.seqs = None

    def migration_prologue(self):
        # BEGIN IMMEDIATE already holds the database's write lock.
        return
        yield

    def table_exists(self, name):
        rows = yield Query(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = %s", (name,)
        )
        return bool(rows)

    def migration_epilogue(self):
        return
        yield

    def next_seqs(self, count):
        return [next(self.seqs) for _ in range(count)]
        yield

    def lock_chains(self, mesh_ids):
        return
        yield

    def claim_txn(self, request):
        where, params = claimable_where(request)
        rows = yield Query(
            "SELECT %s FROM deliveries d JOIN messages m ON m.id = d.message_id"
            " WHERE %s ORDER BY d.seq, d.recipient_key LIMIT %%s"
            % (CLAIMED_SELECT.format(d="d"), where),
            params + (request.limit,),
        )
        if not rows:
            return []
        keys = [(row[0], row[1]) for row in rows]
        message_ids = sorted({message_id for message_id, _ in keys})
        yield Execute(
            "UPDATE deliveries SET state = 'leased', lease_session = %%s,"
            " lease_until = %%s, attempts = attempts + 1"
            " WHERE message_id IN (%s) AND (message_id, recipient_key) IN (VALUES %s)"
            % (placeholders(len(message_ids)), placeholders(len(keys), 2)),
            (request.presence_id, request.now + request.lease_ms)
            + tuple(message_ids) + flatten(keys),
        )
        return [claimed_from_row(row, attempts_delta=1) for row in rows]
