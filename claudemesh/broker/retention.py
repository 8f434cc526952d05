"""
Retention: deliveries past their expiry become C{expired}; messages older
than the retention period with nothing left to deliver are deleted.

Run from a L{twisted.application.internet.TimerService} through
L{claudemesh.broker.tap.timer_step}, which logs a failed step and keeps the
loop alive (one exception must never stop retention for good).
"""

from twisted.internet import defer
from twisted.logger import Logger

DAY_MS = 24 * 3600 * 1000
# Often enough that expiry is honoured within minutes, rarely enough that the
# sweep's queries are noise next to the traffic.
RETENTION_INTERVAL_SECONDS = 300


class RetentionSweep:
    _log = Logger()

    def __init__(self, store, clock, retention_days, metrics=None):
        self._store = store
        self._clock = clock
        self._retention_days = retention_days
        self._metrics = metrics

    @defer.inlineCallbacks
    def run(self):
        """
        One sweep. Fires with C{(expired, deleted)}.
        """
        now = int(self._clock.seconds() * 1000)
        expired = yield self._store.expire_deliveries(now)
        deleted = 0
        if self._retention_days:
            deleted = yield self._store.delete_messages_before(
                now - self._retention_days * DAY_MS)
        if self._metrics is not None:
            queued = yield self._store.count_queued()
            self._metrics.deliveries_queued.set(queued)
        if expired or deleted:
            self._log.info("retention: {expired} deliveries expired, {deleted} messages deleted",
                           expired=expired, deleted=deleted)
        return expired, deleted
