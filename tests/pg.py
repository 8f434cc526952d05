"""
A PostgreSQL server for tests, when one is reachable.

The server comes from C{CLAUDEMESH_TEST_DATABASE_URL}, else from a local
socket (C{host=/var/run/postgresql user=postgres}), else from
C{postgresql://postgres@127.0.0.1:5432/postgres}; the probe runs once per
process. Each test process works in a database of its own,
C{claudemesh_test_<pid>_<random>}, dropped when the process exits, and each
test in a schema of its own inside it (L{new_schema}), dropped by the test.

Test modules skip their Postgres cases with::

    dsn, reason = postgres_dsn_or_skip_reason()
    class SomethingPostgresTests(TestCase):
        skip = reason
"""

import atexit
import itertools
import os
import random

import psycopg2
import psycopg2.extensions

ENVIRONMENT_VARIABLE = "CLAUDEMESH_TEST_DATABASE_URL"
SKIP_REASON = (
    "PostgreSQL not reachable (set CLAUDEMESH_TEST_DATABASE_URL=postgresql://…"
    " to run the Postgres store tests)"
)
_CANDIDATES = (
    "host=/var/run/postgresql user=postgres",
    "postgresql://postgres@127.0.0.1:5432/postgres",
)

_probed = {}
_schemas = itertools.count(1)


def _probe():
    """
    The first DSN that accepts a connection, or C{(None, reason)}.
    """
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    candidates = (configured,) if configured else _CANDIDATES
    errors = []
    for dsn in candidates:
        try:
            connection = psycopg2.connect(dsn, connect_timeout=2)
        except psycopg2.Error as e:
            errors.append(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
            continue
        connection.close()
        return dsn, None
    reason = SKIP_REASON
    if configured:
        reason += ": %s" % ("; ".join(errors),)
    return None, reason


def _create_test_database(maintenance_dsn):
    """
    Create this process's database and arrange to drop it at exit. When the
    role may not create databases, use the maintenance database itself:
    the per-test schemas still keep tests apart.
    """
    name = "claudemesh_test_%d_%06x" % (os.getpid(), random.getrandbits(24))
    try:
        run(maintenance_dsn, 'CREATE DATABASE "%s"' % (name,))
    except psycopg2.Error:
        return maintenance_dsn

    def drop():
        try:
            # FORCE: a test that failed may have left a connection behind.
            run(maintenance_dsn, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % (name,))
        except psycopg2.Error:
            pass

    atexit.register(drop)
    return psycopg2.extensions.make_dsn(maintenance_dsn, dbname=name)


def postgres_dsn_or_skip_reason():
    """
    C{(dsn, None)} for this process's test database, or C{(None, reason)}
    when no server is reachable.
    """
    if "result" not in _probed:
        dsn, reason = _probe()
        if dsn is not None:
            dsn = _create_test_database(dsn)
        _probed["result"] = (dsn, reason)
    return _probed["result"]


def run(dsn, sql, params=None):
    """
    Run one statement synchronously in autocommit mode; return its rows when
    it has any.
    """
    connection = psycopg2.connect(dsn, connect_timeout=2)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            if cursor.description is not None:
                return cursor.fetchall()
            return None
    finally:
        connection.close()


def new_schema():
    """
    A schema name not used before in this process.
    """
    return "claudemesh_t%d" % (next(_schemas),)


def drop_schema(dsn, name):
    run(dsn, 'DROP SCHEMA IF EXISTS "%s" CASCADE' % (name,))


def terminate_other_backends(dsn):
    """
    Kill every other connection to the test database, as a server restart
    would. Returns how many were killed.
    """
    rows = run(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return len(rows)
