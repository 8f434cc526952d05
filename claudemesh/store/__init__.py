"""
Durable state of the broker, behind L{IStore}.

Two providers pass one shared test suite (C{tests/test_store.py}):

  - L{SQLiteStore}, the embedded default: one file in the data directory
    (and, run inline on C{:memory:}, the store of the core's unit tests);
  - L{PostgresStore}, when C{DATABASE_URL} is a C{postgresql://} URL.

L{make_store} picks one from the configuration, L{describe_store} says which
for the logs (without the password), and L{StoreService} opens and closes it
with the application.
"""

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from claudemesh.store.interface import (
    DuplicateKey,
    IStore,
    SchemaTooNew,
    StoreError,
    StoreUnavailable,
)
from claudemesh.store.postgres import DEFAULT_SCHEMA, PostgresStore
from claudemesh.store.sqlite import SQLiteStore

__all__ = [
    "IStore",
    "StoreError",
    "StoreUnavailable",
    "DuplicateKey",
    "SchemaTooNew",
    "SQLiteStore",
    "PostgresStore",
    "StoreService",
    "make_store",
    "describe_store",
    "sqlite_path",
    "DEFAULT_SCHEMA",
]

SQLITE_FILENAME = "claudemesh.sqlite3"
_POSTGRES_SCHEMES = ("postgresql", "postgres")

log = Logger()


def sqlite_path(data_dir) -> str:
    """
    Where the embedded database lives in C{data_dir}.
    """
    return os.path.join(os.path.expanduser(data_dir), SQLITE_FILENAME)


def _scheme(database_url: str) -> str:
    return urlsplit(database_url).scheme.lower()


def make_store(database_url, data_dir, schema=DEFAULT_SCHEMA, reactor=None):
    """
    The L{IStore} the configuration asks for (not opened yet).

    @param database_url: C{None} or empty for the embedded SQLite file in
        C{data_dir} (created, mode 0700, when missing); a C{postgresql://} or
        C{postgres://} URL for Postgres.
    @param schema: the Postgres schema holding the tables.
    @raise ValueError: for any other kind of URL.
    """
    if reactor is None:
        from twisted.internet import reactor
    if not database_url:
        data_dir = os.path.expanduser(data_dir)
        if not os.path.isdir(data_dir):
            # 0700: the database holds every mesh's membership and metadata.
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            os.chmod(data_dir, 0o700)
        return SQLiteStore(sqlite_path(data_dir), reactor)
    if _scheme(database_url) in _POSTGRES_SCHEMES:
        return PostgresStore(database_url, schema, reactor)
    raise ValueError(
        "unsupported database URL %r: use postgresql://user@host/dbname for"
        " Postgres, or leave it unset for the embedded SQLite database"
        % (describe_url(database_url),)
    )


def describe_url(url: str) -> str:
    """
    C{url} without its password (in the authority or as a query parameter).
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = "%s@%s" % (user, hostport) if user else hostport
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def describe_store(database_url, data_dir) -> str:
    """
    A one-line description of the configured store for the logs: its kind
    and location, never its password.
    """
    if not database_url:
        return "sqlite %s" % (sqlite_path(data_dir),)
    if _scheme(database_url) in _POSTGRES_SCHEMES:
        return "postgres %s" % (describe_url(database_url),)
    return "unsupported %s" % (describe_url(database_url),)


class StoreService(Service):
    """
    Open the store when the application starts and close it when it stops.

    C{startService} returns a L{Deferred} for callers that wait for it, but
    twistd does not: whatever needs the store open (the broker core's
    start-up) should chain on L{whenOpen}. A failure to open is logged here
    too, so that it is never silent.
    """

    _NOT_YET = object()

    def __init__(self, store):
        self.store = store
        self._outcome = self._NOT_YET
        self._waiting = []

    def startService(self):
        Service.startService(self)
        self._outcome = self._NOT_YET
        d = self.store.open()
        d.addBoth(self._finished_opening)
        return self.whenOpen()

    def _finished_opening(self, result):
        if isinstance(result, Failure):
            log.failure("Could not open the store {store!r}", result, store=self.store)
        self._outcome = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._fire(d)
        return None

    def _fire(self, d):
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)

    def whenOpen(self):
        """
        A L{Deferred} firing once the store is open, or failing as opening
        failed.
        """
        d = defer.Deferred()
        if self._outcome is self._NOT_YET:
            self._waiting.append(d)
        else:
            self._fire(d)
        return d

    def stopService(self):
        Service.stopService(self)
        return self.store.close()
