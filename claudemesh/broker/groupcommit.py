"""
Group commit: the broker's writes to the store, gathered into batches.

Writes are queued as they happen and flushed together on the next reactor
turn, one batch in flight at a time: while a batch commits, the next one
fills. Each batch is one L{WriteBatch}, applied by the store in one
transaction, so a burst of sends costs one commit per batch instead of
several per message, and a message is acknowledged only after the batch
holding it committed.
"""

from twisted.internet import defer
from twisted.logger import Logger

from claudemesh.store.interface import StoreUnavailable
from claudemesh.store.records import WriteBatch


class GroupCommit:
    _log = Logger()

    def __init__(self, store, clock, metrics=None, max_batch=1000):
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._max_batch = max_batch
        self._opens = []
        self._messages = []
        self._waiters = []
        # (event, message): audit events in the order they happened, each
        # with the message it records (or None). An event travels in the
        # batch of its message, never in an earlier one.
        self._audit = []
        self._updates = []
        self._acks = []
        self._releases = []
        self._release_waiters = []
        self._closes = []
        self._flush_waiters = []
        self._in_flight = None
        self._scheduled = None

    def _pending(self):
        return bool(self._opens or self._messages or self._audit or self._updates
                    or self._acks or self._releases or self._closes)

    # -- what callers queue --------------------------------------------------

    def enqueue(self, message, audit=None):
        """
        Queue a L{NewMessage} (and its audit event). The L{Deferred} fires
        with its L{EnqueueResult} once the batch committed, or fails as the
        batch failed.
        """
        d = defer.Deferred()
        self._messages.append(message)
        self._waiters.append(d)
        if audit is not None:
            self._audit.append((audit, message))
        self._schedule()
        return d

    def audit(self, event):
        self._audit.append((event, None))
        self._schedule()

    def open_session(self, record):
        self._opens.append(record)
        self._schedule()

    def update_session(self, presence_id, fields):
        self._updates.append((presence_id, fields))
        self._schedule()

    def ack(self, message_id, member_id, recipient_key):
        self._acks.append((message_id, member_id, recipient_key))
        self._schedule()

    def release_leases(self, presence_id):
        """
        Queue giving back the leases of a session. The L{Deferred} fires
        (never fails) once the batch holding the release was written, so a
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
        A L{Deferred} that fires once everything queued so far was written
        (used at shutdown and by tests).
        """
        if not self._pending() and self._in_flight is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._flush_waiters.append(d)
        self._schedule()
        return d

    # -- flushing ------------------------------------------------------------

    def _schedule(self):
        if self._in_flight is not None or self._scheduled is not None:
            return
        self._scheduled = self._clock.callLater(0, self._flush)

    def _take(self):
        """
        Everything queued (at most C{max_batch} messages) as one batch, with
        the Deferreds waiting for it.
        """
        cut = self._max_batch
        audit_cut = len(self._audit)
        if len(self._messages) > cut:
            # The events of the messages left for the next batch wait with
            # them, and so does everything that happened after them: the
            # chain keeps the order of events, and no event commits before
            # what it records.
            first_left = self._messages[cut]
            audit_cut = next(
                (i for i, (_, message) in enumerate(self._audit) if message is first_left),
                audit_cut)
        batch = WriteBatch(
            opens=tuple(self._opens), messages=tuple(self._messages[:cut]),
            audit=tuple(event for event, _ in self._audit[:audit_cut]),
            updates=tuple(self._updates), acks=tuple(self._acks),
            releases=tuple(self._releases), closes=tuple(self._closes),
            now=int(self._clock.seconds() * 1000))
        waiters, release_waiters = self._waiters[:cut], self._release_waiters
        self._messages, self._waiters = self._messages[cut:], self._waiters[cut:]
        self._audit = self._audit[audit_cut:]
        self._opens, self._updates, self._acks = [], [], []
        self._releases, self._release_waiters, self._closes = [], [], []
        return batch, waiters, release_waiters

    def _requeue(self, batch):
        # Put back what does not answer anyone, in front of newer writes,
        # for the next attempt.
        self._opens[:0] = batch.opens
        self._audit[:0] = [(e, None) for e in batch.audit if e.event_type != "message_sent"]
        self._updates[:0] = batch.updates
        self._acks[:0] = batch.acks
        self._releases[:0] = batch.releases
        self._closes[:0] = batch.closes

    def _flush(self):
        self._scheduled = None
        if self._in_flight is not None or not self._pending():
            self._notify_flushed()
            return
        batch, waiters, release_waiters = self._take()
        started = self._clock.seconds()
        self._in_flight = d = self._store.write_batch(batch)
        d.addCallbacks(self._committed, self._failed, callbackArgs=(waiters,),
                       errbackArgs=(batch, waiters))
        d.addBoth(self._done, started, batch, release_waiters)

    def _committed(self, results, waiters):
        for d, result in zip(waiters, results):
            d.callback(result)
        return True

    def _failed(self, f, batch, waiters):
        self._log.failure("writing a batch of {count} messages and {other} other writes failed",
                          f, count=len(batch.messages),
                          other=len(batch.opens) + len(batch.updates) + len(batch.acks)
                          + len(batch.releases) + len(batch.closes))
        for d in waiters:
            d.errback(f)
        if f.check(StoreUnavailable):
            self._requeue(batch)
        return False

    def _done(self, ok, started, batch, release_waiters):
        self._in_flight = None
        if self._metrics is not None:
            self._metrics.store_batch_seconds.observe(self._clock.seconds() - started)
            self._metrics.store_batch_size.observe(
                len(batch.opens) + len(batch.messages) + len(batch.audit) + len(batch.updates)
                + len(batch.acks) + len(batch.releases) + len(batch.closes))
        for d in release_waiters:
            d.callback(None)
        if self._pending() and ok:
            self._flush()
        elif self._pending():
            # The store is down: try again a little later rather than spin.
            self._scheduled = self._clock.callLater(1.0, self._flush)
        else:
            self._notify_flushed()
        return None

    def _notify_flushed(self):
        if self._flush_waiters and not self._pending() and self._in_flight is None:
            waiters, self._flush_waiters = self._flush_waiters, []
            for d in waiters:
                d.callback(None)
