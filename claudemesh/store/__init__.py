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
    DatabaseInUse,
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
    "DatabaseInUse",
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
    C{url} without its password (in the authority or as a query parameter)
    nor any other C{…password} parameter.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = "%s@%s" % (user, hostport) if user else hostport
    query = urlencode(
        # password, and sslpassword (the passphrase of the client's key).
        [(k, v) for k, v in parse_qsl(parts.query) if "password" not in k.lower()]
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


OPEN_RETRY_DELAYS = (1, 2, 4, 8, 16, 30)


def advice(store, failure):
    """
    What an operator can do about C{failure} to open C{store}: the store's
    own advice (L{PostgresStore.advice}) or C{""}.
    """
    method = getattr(store, "advice", None)
    return method(failure) if method is not None else ""


class StoreService(Service):
    """
    Open the store when the application starts, retrying until it opens,
    and close it when it stops.

    A store that cannot be opened at start-up (Postgres down, the database
    not created yet) is tried again after 1, 2, 4, 8, 16 and then every 30
    seconds, with one log line per failure saying what failed and what to
    do; the broker becomes ready once it opens, without a restart. Only a
    schema newer than this broker (L{SchemaTooNew}) is not retried: that
    takes an upgrade, not time.

    twistd does not wait for C{startService}: whatever needs the store open
    (the broker core's start-up) chains on L{whenOpen}.
    """

    _NOT_YET = object()

    def __init__(self, store, clock=None, delays=OPEN_RETRY_DELAYS):
        """
        @param clock: an L{IReactorTime} for the retries; the global reactor
            when C{None} (looked up only when a retry is needed).
        """
        self.store = store
        self._clock = clock
        self._delays = delays
        self._outcome = self._NOT_YET
        self._waiting = []
        self._retry_call = None
        self.attempts = 0

    def startService(self):
        Service.startService(self)
        self._outcome = self._NOT_YET
        self.attempts = 0
        self._try_open()
        return self.whenOpen()

    def _try_open(self):
        self._retry_call = None
        self.attempts += 1
        d = defer.maybeDeferred(self.store.open)
        d.addBoth(self._finished_opening)

    def _finished_opening(self, result):
        if not self.running:
            # Stopped meanwhile: stopService closes the store.
            return None
        if isinstance(result, Failure) and not result.check(SchemaTooNew):
            clock = self._clock
            if clock is None:
                from twisted.internet import reactor as clock
            delay = self._delays[min(self.attempts - 1, len(self._delays) - 1)]
            error = _first_line(result)
            if not result.check(StoreUnavailable):
                # StoreUnavailable names the store itself.
                error = "%s: %s" % (describe(self.store), error)
            log.error(
                "Cannot open the store: {error}.{advice} Retrying in {delay} s; "
                "/health/ready answers 503 until then.",
                error=error.rstrip("."),
                advice=(" " + advice(self.store, result)) if advice(self.store, result) else "",
                delay=delay)
            self._retry_call = clock.callLater(delay, self._try_open)
            return None
        if isinstance(result, Failure):
            log.failure("Could not open the store {store!r}", result, store=self.store)
        elif self.attempts > 1:
            log.info("The store is open (after {attempts} attempts).", attempts=self.attempts)
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
        A L{Deferred} firing once the store is open, or failing when it
        cannot be opened for good (L{SchemaTooNew}).
        """
        d = defer.Deferred()
        if self._outcome is self._NOT_YET:
            self._waiting.append(d)
        else:
            self._fire(d)
        return d

    def stopService(self):
        Service.stopService(self)
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        return self.store.close()


def describe(store) -> str:
    """
    A store for a log line, without secrets.
    """
    return repr(store)


def _first_line(failure) -> str:
    text = str(failure.value).strip()
    return text.splitlines()[0].strip() if text else failure.type.__name__
