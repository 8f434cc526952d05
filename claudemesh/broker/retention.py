"""
Retention: deliveries past their expiry become C{expired}; messages older
than the retention period with nothing left to deliver are deleted, and so
are the idempotency keys that expired before it.

Each of those runs in batches of at most L{RETENTION_BATCH} rows, one
transaction each, with a turn of the reactor between two batches: a store
holding a million old messages is swept in many short transactions, and the
group commits of live traffic get the store between them instead of waiting
behind one long C{DELETE} (on SQLite there is one writer).

Run from a L{twisted.application.internet.TimerService} through
L{claudemesh.broker.tap.timer_step}, which logs a failed step and keeps the
loop alive (one exception must never stop retention for good).
"""

from twisted.internet import defer, task
from twisted.logger import Logger

DAY_MS = 24 * 3600 * 1000
# Often enough that expiry is honoured within minutes, rarely enough that the
# sweep's queries are noise next to the traffic.
RETENTION_INTERVAL_SECONDS = 300
# Rows per sweep transaction: a few milliseconds of the store each.
RETENTION_BATCH = 2000


class RetentionSweep:
    _log = Logger()

    def __init__(self, store, clock, retention_days, metrics=None, batch=RETENTION_BATCH):
        self._store = store
        self._clock = clock
        self._retention_days = retention_days
        self._metrics = metrics
        self._batch = batch

    @defer.inlineCallbacks
    def _in_batches(self, step, bound):
        """
        Call C{step(bound, limit)} until it does less than a full batch,
        yielding to the reactor between two calls. Fires with the total.
        """
        total = 0
        while True:
            count = yield step(bound, self._batch)
            total += count
            if count < self._batch:
                return total
            # Let whatever the reactor queued meanwhile (a group commit)
            # reach the store before the next batch.
            yield task.deferLater(self._clock, 0, lambda: None)

    @defer.inlineCallbacks
    def run(self):
        """
        One sweep. Fires with C{(expired, deleted)}.
        """
        now = int(self._clock.seconds() * 1000)
        expired = yield self._in_batches(self._store.expire_deliveries, now)
        deleted = 0
        if self._retention_days:
            cutoff = now - self._retention_days * DAY_MS
            deleted = yield self._in_batches(self._store.delete_messages_before, cutoff)
            yield self._in_batches(self._store.delete_send_keys_before, cutoff)
        if self._metrics is not None:
            queued = yield self._store.count_queued()
            self._metrics.deliveries_queued.set(queued)
        if expired or deleted:
            self._log.info("retention: {expired} deliveries expired, {deleted} messages deleted",
                           expired=expired, deleted=deleted)
        return expired, deleted
