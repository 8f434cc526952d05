"""
The Postgres backplane of a cluster (issue 15): one connection of its own
that C{LISTEN}s on the schema's channel and hands each notification to the
broker core as a L{Notice}.

The notices themselves are sent by the store, inside the transaction that
stores the change they are about (L{PostgresDialect.notify_txn}), so
L{PostgresBackplane.committed} has nothing left to do.

When the listening connection drops (the server restarted, an operator ended
the backend, the network) its L{DeadConnectionDetector} reconnects with
backoff; once it is back, it listens again and asks the core to re-scan,
since whatever was notified meanwhile is lost. A query every few seconds
finds a connection that died without a word.
"""

import psycopg2
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from claudemesh.broker.cluster import IBackplane
from claudemesh.store.postgres import _Connection, _Detector
from claudemesh.store.sql.notices import channel_name, decode

log = Logger()

# How often the listening connection is checked with a query.
KEEPALIVE_SECONDS = 5.0
# How the listening connections show in pg_stat_activity.
APPLICATION_NAME = "claudemesh-listen"


@implementer(IBackplane)
class PostgresBackplane:
    """
    C{LISTEN}/C{NOTIFY} on one connection.

    @param dsn: the store's DSN.
    @param schema: the store's schema (it names the channel).
    """

    single_process = False

    def __init__(self, dsn, schema, reactor):
        self._dsn = dsn
        self._reactor = reactor
        self.channel = channel_name(schema)
        self._setup = 'SET search_path TO "%s"' % (schema,)
        self._connection = None
        self._receive = None
        self._rescan = None
        self._keepalive = None
        self.reconnections = 0

    def start(self, receive, rescan):
        self._receive = receive
        self._rescan = rescan
        detector = _Detector(self._reactor)
        detector.addRecoveryHandler(self._recovered)
        connection = self._connection = _Connection(
            self._reactor, None, detector, self._setup)
        connection.addNotifyObserver(self._notified)
        d = connection.connect(self._dsn, client_encoding="UTF8",
                               application_name=APPLICATION_NAME)
        d.addCallback(lambda _: self._listen())
        d.addErrback(self._connect_failed)
        self._keepalive = task.LoopingCall(self._check)
        self._keepalive.clock = self._reactor
        self._keepalive.start(KEEPALIVE_SECONDS, now=False)
        return d

    def _connect_failed(self, failure):
        # The first connection failed: the detector does not know the
        # connection yet, so the keepalive tries again.
        log.warn("cannot listen for other nodes' notices yet: {error}",
                 error=str(failure.value).strip().splitlines()[0][:200]
                 if str(failure.value).strip() else failure.type.__name__)
        self._connection = None

    def _listen(self):
        return self._connection.runOperation('LISTEN "%s"' % (self.channel,))

    def _recovered(self):
        self.reconnections += 1
        log.info("listening for other nodes' notices again; re-scanning what may be missed")
        d = self._listen()
        d.addCallback(lambda _: self._rescan() if self._rescan is not None else None)
        d.addErrback(lambda f: log.warn("listening again failed: {error}",
                                        error=f.getErrorMessage()[:200]))
        return d

    def _check(self):
        if self._receive is None:
            return None
        if self._connection is None:
            # Never connected: try from the start.
            receive, rescan = self._receive, self._rescan
            self._keepalive.stop()
            d = self.start(receive, rescan)
            d.addCallback(lambda _: self._rescan() if self._connection is not None else None)
            return None
        d = self._connection.runQuery("SELECT 1")
        # A failure starts the detector's reconnection; nothing else to do.
        d.addErrback(lambda f: None)
        return None

    def _notified(self, notify):
        if notify.channel != self.channel or self._receive is None:
            return
        notice = decode(notify.payload)
        if notice is not None:
            self._receive(notice)

    def committed(self, notices):
        """
        Sent by the store's transaction already.
        """

    def backend_pid(self):
        """
        The server process of the listening connection (tests end it to
        drop the connection).
        """
        connection = self._connection
        if connection is None or connection._connection is None:
            return None
        try:
            return connection._connection.get_backend_pid()
        except psycopg2.Error:
            return None

    def stop(self):
        self._receive = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.detector.stop()
            connection.close()
        return defer.succeed(None)
