"""
The Postgres store, on txpostgres (psycopg2 in asynchronous mode: no
threads).

Connections: a small pool whose every connection has its own
L{DeadConnectionDetector}. When the server goes away, the first query on each
connection fails and starts reconnecting in the background; until it is back
every call on that connection fails at once with L{StoreUnavailable} instead
of waiting, and when it is back the store works again without a restart.
Each connection sets C{search_path} to the configured schema as soon as it
connects (again after every reconnection), so the SQL never names the schema.

Concurrency, since several connections (and possibly several brokers) share
the database:

  - the schema upgrade runs under a transaction-level advisory lock, so two
    brokers starting at once upgrade once;
  - message sequence numbers come from the C{message_seq} SEQUENCE (created
    by code, as SQLite has no sequences), taken under a transaction-level
    advisory lock that also serialises the enqueue transactions, so that
    C{seq} order is commit order and a claim never sees seq 7 before seq 6
    commits;
  - each mesh's audit chain is extended under its own advisory lock, taken
    in sorted order so two transactions cannot deadlock;
  - a claim picks its rows with C{FOR UPDATE SKIP LOCKED}, so concurrent
    claims lease disjoint sets without waiting on each other.

Batches: psycopg2 refuses C{executemany} in asynchronous mode, so many rows
become one multi-row C{INSERT … VALUES (…), (…)} built with C{mogrify}: one
round trip per table per batch.

The DSN's password never appears in logs or errors: see L{safe_dsn}.
"""

import re

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from txpostgres.retrying import RetryingCall

from claudemesh.store import schema
from claudemesh.store.interface import DuplicateKey, StoreUnavailable
from claudemesh.store.sql import Dialect, SQLStore
from claudemesh.store.sql import notices as notice_wire
from claudemesh.store.sql.messages import CLAIMED_SELECT, claimable_where, claimed_from_row
from claudemesh.store.sql.operations import Execute, InsertRows, Query, placeholders
from claudemesh.store.sql.sessions import SESSION_UPDATABLE

log = Logger()

DEFAULT_SCHEMA = "claudemesh"

# Lower-case identifiers only: the schema name is spliced into SQL.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# SQLSTATEs meaning the connection is gone: class 08 (connection exception)
# and the server shutting down or not yet accepting connections.
_CONNECTION_GONE = ("57P01", "57P02", "57P03")


def safe_dsn(dsn: str) -> str:
    """
    Describe C{dsn} (a URL or C{key=value} string) without its password.
    """
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<unparseable DSN>"
    # password, and sslpassword (the passphrase of the client's key).
    params = {k: v for k, v in params.items() if "password" not in k.lower()}
    return " ".join("%s=%s" % item for item in sorted(params.items()))


def _connection_failure(failure) -> bool:
    """
    Does C{failure} mean the connection itself failed (rather than the
    statement)? Also the death checker of the connections' detectors: a
    deadlock or a cancelled statement must not make them reconnect.
    """
    if failure.check(psycopg2.InterfaceError, txpostgres.RollbackFailed):
        return True
    if failure.check(psycopg2.OperationalError):
        code = getattr(failure.value, "pgcode", None)
        return code is None or code.startswith("08") or code in _CONNECTION_GONE
    return False


def _describe(failure) -> str:
    """
    The first line of the error behind C{failure}, for one-line log messages.
    """
    error = failure.value
    if isinstance(error, txpostgres.RollbackFailed):
        error = error.originalFailure.value
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _Detector(DeadConnectionDetector):
    """
    A L{DeadConnectionDetector} that can be stopped, so that closing the
    store also ends a reconnection loop (and its pending timer).
    """

    stopped = False
    _retrying = None

    def __init__(self, reactor):
        DeadConnectionDetector.__init__(
            self, deathChecker=_connection_failure, reactor=reactor
        )

    def startReconnecting(self, f):
        if self.stopped:
            return
        log.warn(
            "PostgreSQL connection lost ({error}); reconnecting", error=_describe(f)
        )
        call = RetryingCall(self.reconnect)
        call.reactor = self.reactor
        d = self._retrying = call.start(
            self.reconnectionIterator(), self._keep_trying
        )
        d.addCallback(lambda _: self.connectionRecovered())
        d.addErrback(self._gave_up)

    def _keep_trying(self, failure):
        # None: try again after the next delay.
        return failure if self.stopped else None

    def _gave_up(self, failure):
        if not self.stopped:
            log.failure("PostgreSQL reconnection ended", failure)

    def connectionRecovered(self):
        self._retrying = None
        log.info("PostgreSQL connection recovered")
        return DeadConnectionDetector.connectionRecovered(self)

    def stop(self):
        self.stopped = True
        retrying, self._retrying = self._retrying, None
        if retrying is not None and not retrying.called:
            try:
                retrying.cancel()
            except Exception:
                # Cancelling a connection attempt mid-way may complain; the
                # connection is closed right after anyway, which ends it.
                pass


class _Connection(txpostgres.Connection):
    """
    A connection that prepares its session (C{search_path}) before anyone
    may use it, on the first connection and on every reconnection.
    """

    def __init__(self, reactor, cooperator, detector, setup_sql):
        txpostgres.Connection.__init__(self, reactor, cooperator, detector)
        self._setup_sql = setup_sql

    def connect(self, *args, **kwargs):
        d = txpostgres.Connection.connect(self, *args, **kwargs)
        # Run on a bare cursor, not through the connection's lock: during a
        # reconnection the detector still fails every other caller, so
        # nothing can run before the search path is set.
        d.addCallback(lambda _: self.cursor().execute(self._setup_sql))
        d.addCallback(lambda _: self)
        return d

    def doRead(self):
        # The server closing the connection (a restart, an operator ending
        # the backend) surfaces as psycopg2's OperationalError from the
        # poll: returned, not raised, the reactor hands it to connectionLost
        # (and the detector reconnects) without an "Unhandled Error"
        # traceback in the log; the detector logs one line instead.
        try:
            return txpostgres.Connection.doRead(self)
        except psycopg2.OperationalError as e:
            return e

    def close(self):
        # A connection whose psycopg2 connect() raised has nothing to close.
        if self._connection is not None:
            txpostgres.Connection.close(self)


class _Pool(txpostgres.ConnectionPool):
    """
    A txpostgres pool of L{_Connection}s, each with its own L{_Detector}.
    """

    def __init__(self, reactor, size, setup_sql, dsn, **connkw):
        self.reactor = reactor
        self.min = size
        self._setup_sql = setup_sql
        # The base class only tracks idle connections; closing must reach
        # the busy ones too.
        self.every_connection = []
        txpostgres.ConnectionPool.__init__(self, None, dsn, **connkw)

    def connectionFactory(self, reactor, cooperator):
        connection = _Connection(
            reactor, cooperator, _Detector(reactor), self._setup_sql
        )
        self.every_connection.append(connection)
        return connection

    def close(self):
        for connection in self.every_connection:
            connection.detector.stop()
            connection.close()


def _execute(cursor, operation):
    if isinstance(operation, Query):
        d = cursor.execute(operation.sql, operation.params or None)
        return d.addCallback(lambda c: c.fetchall())
    if isinstance(operation, Execute):
        d = cursor.execute(operation.sql, operation.params or None)
        return d.addCallback(lambda c: c.rowcount)
    if isinstance(operation, InsertRows):
        if not operation.rows:
            return defer.succeed(None)
        one_row = "(" + placeholders(len(operation.columns)) + ")"
        values = b", ".join(cursor.mogrify(one_row, row) for row in operation.rows)
        head, tail = operation.statement("\0").encode("utf-8").split(b"\0")
        d = cursor.execute(head + values + tail)
        return d.addCallback(lambda _: None)
    return defer.fail(TypeError("not an SQL operation: %r" % (operation,)))


@defer.inlineCallbacks
def _drive(cursor, operation, args):
    """
    Run the generator of SQL operations C{operation(*args)} to completion on
    the asynchronous C{cursor}.
    """
    generator = operation(*args)
    result = None
    while True:
        try:
            step = generator.send(result)
        except StopIteration as stop:
            return stop.value
        result = yield _execute(cursor, step)


class PostgresStore(SQLStore):
    """
    An L{IStore} in a Postgres schema.

    @param dsn: a libpq connection string or C{postgresql://} URL.
    @param schema: the schema holding the tables, created when missing.
    @param pool_size: how many connections to keep open.
    @param connect_timeout: seconds L{open} waits for the connections.
    """

    kind = "postgres"

    def __init__(
        self,
        dsn,
        schema=DEFAULT_SCHEMA,
        reactor=None,
        pool_size=4,
        connect_timeout=10.0,
    ):
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(
                "Postgres schema name %r: use lower-case letters, digits and"
                " underscores, starting with a letter or underscore" % (schema,)
            )
        if reactor is None:
            from twisted.internet import reactor
        self.dsn = dsn
        self.schema = schema
        self._reactor = reactor
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool = None
        self.dialect = PostgresDialect(schema)

    def __repr__(self):
        return "<PostgresStore %s schema=%s>" % (safe_dsn(self.dsn), self.schema)

    def advice(self, failure):
        """
        What to do about a failure to open, for the start-up log line:
        create the database, start the server, fix the credentials.
        """
        text = str(failure.value)
        try:
            params = psycopg2.extensions.parse_dsn(self.dsn)
        except psycopg2.ProgrammingError:
            params = {}
        dbname = params.get("dbname", "claudemesh")
        options = "".join(" -%s %s" % (flag, params[key]) for flag, key in
                          (("h", "host"), ("p", "port"), ("U", "user")) if params.get(key))
        if "does not exist" in text and "database" in text:
            return ("Create the database: createdb%s %s (or CREATE DATABASE %s; in psql)."
                    % (options, dbname, dbname))
        if "does not exist" in text and "role" in text:
            return "Create the role: createuser%s, or fix the user in DATABASE_URL." % (
                options,)
        if "password authentication failed" in text or "no password supplied" in text:
            return "Check the user and password in DATABASE_URL."
        if "Connection refused" in text or "could not connect" in text or (
                "No such file or directory" in text):
            return "Is PostgreSQL running and listening there (pg_isready%s)?" % (options,)
        return ""

    def _unavailable(self, reason):
        return StoreUnavailable(
            "PostgreSQL (%s) is unavailable: %s" % (safe_dsn(self.dsn), reason)
        )

    # -- opening and closing -------------------------------------------------

    def open(self):
        pool = self._pool = _Pool(
            self._reactor,
            self._pool_size,
            'SET search_path TO "%s"' % (self.schema,),
            self.dsn,
            client_encoding="UTF8",
        )
        opened = defer.Deferred()

        # Our own timeout rather than Deferred.addTimeout: cancelling a
        # txpostgres connection attempt raises from inside cancel(); closing
        # the pool ends the attempts cleanly instead.
        def timed_out():
            self._close_pool()
            opened.errback(
                self._unavailable(
                    "no connection after %s seconds" % (self._connect_timeout,)
                )
            )

        timer = self._reactor.callLater(self._connect_timeout, timed_out)

        def started(result):
            if not timer.active():
                # Already reported as a timeout.
                return None
            timer.cancel()
            if isinstance(result, Failure):
                opened.errback(result)
            else:
                opened.callback(result)

        d = pool.start()
        d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        d.addBoth(started)

        opened.addCallback(
            lambda _: self._run_transaction(schema.migrate, (self.dialect,), True))

        def failed(failure):
            self._close_pool()
            return failure

        opened.addErrback(self._map_failure)
        opened.addErrback(failed)
        return opened.addCallback(lambda _: None)

    def close(self):
        self._close_pool()
        return defer.succeed(None)

    def _close_pool(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def ping(self):
        if self._pool is None:
            return defer.fail(self._unavailable("the store is not open"))
        # One round trip, no transaction.
        d = self._pool.runQuery("SELECT 1")
        d.addCallback(lambda _: None)
        return d.addErrback(self._map_failure)

    # -- running transactions -----------------------------------------------

    def _run_transaction(self, operation, args, write):
        if self._pool is None:
            return defer.fail(self._unavailable("the store is not open"))
        d = self._pool.runInteraction(_drive, operation, args)
        return d.addErrback(self._map_failure)

    def _map_failure(self, failure):
        if failure.check(psycopg2.errors.UniqueViolation):
            raise DuplicateKey(str(failure.value).strip()) from failure.value
        if failure.check(ConnectionDead):
            raise self._unavailable("reconnecting") from failure.value
        if _connection_failure(failure):
            raise self._unavailable(_describe(failure)) from failure.value
        return failure


class PostgresDialect(Dialect):
    """
    What Postgres does its own way: several connections (and brokers) share
    the database, so sequence numbers, audit chains and the schema upgrade
    take advisory locks, and a claim skips rows another claim holds.
    """

    row_lock = " FOR UPDATE"

    def __init__(self, schema):
        self.schema = schema

    def lock_key(self, *parts):
        return "claudemesh/%s/%s" % (self.schema, "/".join(parts))

    def migration_prologue(self):
        yield Query(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (self.lock_key("schema"),),
        )
        # CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when
        # the schema exists; a database role may own a pre-made schema only.
        rows = yield Query(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
        )
        if not rows:
            yield Execute('CREATE SCHEMA "%s"' % (self.schema,))

    def table_exists(self, name):
        rows = yield Query(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s",
            (self.schema, name),
        )
        return bool(rows)

    def migration_epilogue(self):
        yield Execute("CREATE SEQUENCE IF NOT EXISTS message_seq")

    def next_seqs(self, count):
        if not count:
            return []
        yield Query(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (self.lock_key("enqueue"),),
        )
        rows = yield Query(
            "SELECT nextval('message_seq') FROM generate_series(1, %s)", (count,)
        )
        return sorted(int(row[0]) for row in rows)

    def try_lock(self, name):
        rows = yield Query(
            "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
            (self.lock_key(name),),
        )
        return bool(rows[0][0])

    def notify_txn(self, notices):
        # NOTIFY inside the storing transaction: Postgres delivers it only
        # if (and once) the transaction commits.
        payloads = notice_wire.payloads(notices)
        if payloads:
            yield Query(
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                (notice_wire.channel_name(self.schema), payloads),
            )

    def lock_chains(self, mesh_ids):
        yield Query(
            "SELECT pg_advisory_xact_lock(hashtextextended(k, 0))"
            " FROM (SELECT unnest(%s::text[]) AS k ORDER BY 1) AS keys",
            ([self.lock_key("audit", mesh_id) for mesh_id in sorted(mesh_ids)],),
        )

    def claim_txn(self, request):
        where, params = claimable_where(request)
        rows = yield Query(
            "WITH picked AS ("
            " SELECT d.message_id, d.recipient_key FROM deliveries d WHERE %s"
            " ORDER BY d.seq, d.recipient_key LIMIT %%s FOR UPDATE SKIP LOCKED"
            "), claimed AS ("
            " UPDATE deliveries u SET state = 'leased', lease_session = %%s,"
            " lease_until = %%s, attempts = u.attempts + 1"
            " FROM picked p WHERE u.message_id = p.message_id"
            " AND u.recipient_key = p.recipient_key RETURNING u.*"
            ") SELECT %s FROM claimed c JOIN messages m ON m.id = c.message_id"
            " ORDER BY c.seq, c.recipient_key" % (where, CLAIMED_SELECT.format(d="c")),
            params + (request.limit, request.presence_id, request.now + request.lease_ms),
        )
        return [claimed_from_row(row) for row in rows]

    def update_session_rows(self, columns, rows):
        # One statement for every session changing these columns.
        names = ", ".join(columns + ("presence_id",))
        sets = ", ".join(
            "%s = v.%s::%s" % (column, column, SESSION_UPDATABLE[column])
            for column in columns
        )
        yield Execute(
            "UPDATE sessions AS s SET %s FROM (VALUES %s) AS v (%s)"
            " WHERE s.presence_id = v.presence_id"
            % (sets, placeholders(len(rows), len(columns) + 1), names),
            tuple(value for row in rows for value in row),
        )
