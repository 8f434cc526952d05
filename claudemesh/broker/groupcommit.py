"""
Group commit: the broker's writes to the store, gathered into batches.

Writes are queued as they happen and flushed together on the next reactor
turn, one batch in flight at a time: while a batch commits, the next one
fills. A burst of sends thus costs one transaction per batch instead of one
per message, and a message is acknowledged only after the batch holding it
committed. Within a batch the kinds are applied in an order that respects
causality (a session is opened before it is updated or closed; leases are
released after acknowledgements).
"""

from twisted.internet import defer
from twisted.logger import Logger


class GroupCommit:
    _log = Logger()

    def __init__(self, store, clock, metrics=None, max_batch=1000):
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._max_batch = max_batch
        self._reset()
        self._in_flight = None
        self._scheduled = None

    def _reset(self):
        self._opens = []
        self._messages = []
        self._waiters = []
        self._audit = []
        self._updates = []
        self._acks = []
        self._releases = []
        self._release_waiters = []
        self._closes = []

    def _pending(self):
        return (len(self._opens) + len(self._messages) + len(self._audit)
                + len(self._updates) + len(self._acks) + len(self._releases)
                + len(self._closes))

    # -- what callers queue --------------------------------------------------

    def enqueue(self, message, audit=None):
        """
        Queue a L{NewMessage} (and its audit event). The L{Deferred} fires
        with its L{EnqueueResult} once the batch committed.
        """
        d = defer.Deferred()
        self._messages.append(message)
        self._waiters.append(d)
        if audit is not None:
            self._audit.append(audit)
        self._schedule()
        return d

    def audit(self, event):
        self._audit.append(event)
        self._schedule()

    def open_session(self, record):
        self._opens.append(record)
        self._schedule()

    def update_session(self, presence_id, fields):
        self._updates.append((presence_id, fields))
        self._schedule()

    def ack(self, message_id, recipient_key):
        self._acks.append((message_id, recipient_key))
        self._schedule()

    def release_leases(self, presence_id):
        """
        Queue giving back the leases of a session. The L{Deferred} fires
        (never fails) once the batch holding the release committed, so a
        claim made after it can take those deliveries.
        """
        d = defer.Deferred()
        self._releases.append(presence_id)
        self._release_waiters.append(d)
        self._schedule()
        return d

    def close_session(self, presence_id, when):
        self._closes.append((presence_id, when))
        self._schedule()

    def flushed(self):
        """
        A L{Deferred} that fires once everything queued so far is committed
        (used at shutdown and by tests).
        """
        if not self._pending() and self._in_flight is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._flush_waiters = getattr(self, "_flush_waiters", [])
        self._flush_waiters.append(d)
        self._schedule()
        return d

    # -- flushing ------------------------------------------------------------

    def _schedule(self):
        if self._in_flight is not None or self._scheduled is not None:
            return
        self._scheduled = self._clock.callLater(0, self._flush)

    def _flush(self):
        self._scheduled = None
        if self._in_flight is not None or not self._pending():
            self._notify_flushed()
            return
        batch = (self._opens, self._messages[: self._max_batch],
                 self._waiters[: self._max_batch], self._audit, self._updates,
                 self._acks, self._releases, self._closes)
        rest_messages = self._messages[self._max_batch:]
        rest_waiters = self._waiters[self._max_batch:]
        release_waiters = self._release_waiters
        self._reset()
        self._messages, self._waiters = rest_messages, rest_waiters
        started = self._clock.seconds()
        d = self._in_flight = self._commit(*batch)
        d.addBoth(self._committed, started, batch)
        if release_waiters:
            d.addCallback(lambda _: [w.callback(None) for w in release_waiters])

    @defer.inlineCallbacks
    def _commit(self, opens, messages, waiters, audit, updates, acks, releases, closes):
        store = self._store
        # Each kind is its own transaction; a failure of one kind must not
        # lose the others, so each is guarded separately.
        if opens:
            yield self._guard("open_sessions", store.open_sessions(opens))
        if messages or audit:
            try:
                results = yield store.enqueue(messages, audit)
            except Exception as e:
                failure_ = e
                self._log.failure("storing a batch of {count} messages failed",
                                  count=len(messages))
                for d in waiters:
                    d.errback(failure_)
            else:
                for d, result in zip(waiters, results):
                    d.callback(result)
        if updates:
            yield self._guard("update_sessions", store.update_sessions(updates))
        if acks:
            yield self._guard("ack_deliveries", store.ack_deliveries(acks, self._now_ms()))
        if releases:
            yield self._guard("release_leases", store.release_leases(releases))
        if closes:
            by_time = {}
            for presence_id, when in closes:
                by_time.setdefault(when, []).append(presence_id)
            for when, ids in by_time.items():
                yield self._guard("close_sessions", store.close_sessions(ids, when))

    def _guard(self, what, d):
        def failed(f):
            self._log.failure("store write {what} failed", f, what=what)

        return d.addErrback(failed)

    def _now_ms(self):
        return int(self._clock.seconds() * 1000)

    def _committed(self, result, started, batch):
        self._in_flight = None
        if self._metrics is not None:
            self._metrics.store_batch_seconds.observe(self._clock.seconds() - started)
            self._metrics.store_batch_size.observe(sum(len(part) for part in batch) - len(batch[2]))
        if self._pending():
            self._flush()
        else:
            self._notify_flushed()
        return None

    def _notify_flushed(self):
        waiters = getattr(self, "_flush_waiters", [])
        if waiters and not self._pending() and self._in_flight is None:
            self._flush_waiters = []
            for d in waiters:
                d.callback(None)
