"""
Group commit: the broker's writes to the store, gathered into batches.

Writes are queued as they happen and flushed together on the next reactor
turn, one batch in flight at a time: while a batch commits, the next one
fills. Each batch is one L{WriteBatch}, applied by the store in one
transaction, so a burst of sends costs one commit per batch instead of
several per message, and a message is acknowledged only after the batch
holding it committed.

Claims of deliveries go through the same queue: a claim runs in its batch's
transaction after the batch's writes, and sees everything queued before it
— a message, a lease release — and nothing queued after it. That order is
what lets an outbox wake a claim at once, without waiting for what it needs
to see to commit first (L{claudemesh.broker.outbox}).

A batch can fail two ways:

  - the store is unavailable (L{StoreUnavailable}): the messages and claims
    in it fail (senders get C{queued:false}, never a false C{queued:true};
    an outbox tries its claim again on its next wake); every other write goes
    back in front of the queue and is tried again a second later, so nothing
    else is lost;
  - the store refused the data of one write (a constraint, a value the
    database cannot hold): the batch is split in halves, and each half
    written on its own, down to the one write the store refuses, which alone
    is dropped (logged). Everyone else's writes in that batch — messages,
    acknowledgements, lease releases, sessions, audit events — are stored
    (issue 11: one member's bad acknowledgement used to drop a whole batch).
"""

import itertools

from twisted.internet import defer
from twisted.logger import Logger

from claudemesh.store.interface import StoreUnavailable
from claudemesh.store.records import WriteBatch

# The kinds of queued writes, in the order a WriteBatch applies them.
_ORDER = ("open", "message", "audit", "update", "ack", "release", "close", "claim", "notice")
# The kinds whose caller waits for a result (and learns of a failure).
_ANSWERED = ("message", "claim")


class _Write:
    """
    One queued write: its kind (one of L{_ORDER}), its value, and for a
    message its audit event and the Deferred waiting for its result, for a
    claim the Deferred waiting for its rows.
    """

    __slots__ = ("order", "kind", "value", "audit", "waiter")

    _counter = itertools.count()

    def __init__(self, kind, value, audit=None, waiter=None):
        # When it was queued: audit events are chained in this order.
        self.order = next(self._counter)
        self.kind = kind
        self.value = value
        self.audit = audit
        self.waiter = waiter


def _batch_of(writes, now):
    """
    The L{WriteBatch} of C{writes} (in L{_ORDER} order already). A message's
    audit event is chained in the order it was queued among the others.
    """
    parts = {kind: [] for kind in _ORDER}
    audit = []
    for write in writes:
        if write.kind == "message":
            parts["message"].append(write.value)
            if write.audit is not None:
                audit.append((write.order, write.audit))
        elif write.kind == "audit":
            audit.append((write.order, write.value))
        else:
            parts[write.kind].append(write.value)
    audit = [event for _, event in sorted(audit, key=lambda pair: pair[0])]
    return WriteBatch(
        opens=tuple(parts["open"]), messages=tuple(parts["message"]), audit=tuple(audit),
        updates=tuple(parts["update"]), acks=tuple(parts["ack"]),
        releases=tuple(parts["release"]), closes=tuple(parts["close"]),
        claims=tuple(parts["claim"]), now=now, notices=tuple(parts["notice"]))


class GroupCommit:
    _log = Logger()

    # Called with the notices of each batch once it committed (the cluster's
    # backplane, issue 15).
    on_committed = None

    def __init__(self, store, clock, metrics=None, max_batch=1000):
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._max_batch = max_batch
        # kind -> [_Write], each list in the order queued.
        self._queued = {kind: [] for kind in _ORDER}
        self._flush_waiters = []
        self._in_flight = None
        self._scheduled = None

    def _pending(self):
        return any(self._queued.values())

    def _queue(self, write):
        self._queued[write.kind].append(write)
        self._schedule()

    # -- what callers queue --------------------------------------------------

    def enqueue(self, message, audit=None):
        """
        Queue a L{NewMessage} (and its audit event). The L{Deferred} fires
        with its L{EnqueueResult} once it is stored, or fails as it could not
        be (the store unavailable, or refusing this message).
        """
        d = defer.Deferred()
        self._queue(_Write("message", message, audit, d))
        return d

    def audit(self, event):
        self._queue(_Write("audit", event))

    def open_session(self, record):
        self._queue(_Write("open", record))

    def update_session(self, presence_id, fields):
        self._queue(_Write("update", (presence_id, fields)))

    def ack(self, message_id, member_id, recipient_key):
        """
        Queue a confirmation by (a session of) member C{member_id}.
        """
        self._queue(_Write("ack", (message_id, member_id, recipient_key)))

    def release_leases(self, presence_id):
        """
        Queue giving back the leases of a session (a claim queued after this
        sees them back in the queue).
        """
        self._queue(_Write("release", presence_id))

    def claim(self, request):
        """
        Queue a L{ClaimRequest}. The L{Deferred} fires with its
        L{ClaimedDelivery} rows once the batch holding it committed, or fails
        as it could not run.
        """
        d = defer.Deferred()
        self._queue(_Write("claim", request, waiter=d))
        return d

    def close_session(self, presence_id, when):
        self._queue(_Write("close", (presence_id, when)))

    def notice(self, notice):
        """
        Queue a L{Notice} for the other nodes: it goes out with the batch
        that stores what it is about, and only if that batch commits.
        """
        self._queue(_Write("notice", notice))

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
        Everything queued (at most C{max_batch} messages), in L{_ORDER}.
        """
        messages = self._queued["message"]
        # Audit events, claims and notices queued after the first message
        # left for the next batch wait with it: the chain keeps the order of
        # events, no event commits before a message queued earlier, a claim
        # always sees the messages queued before it, and a wake-up never
        # reaches another node before what it is about.
        until = None
        if len(messages) > self._max_batch:
            until = messages[self._max_batch].order
        writes = []
        for kind in _ORDER:
            queued = self._queued[kind]
            if kind == "message":
                taken, left = queued[:self._max_batch], queued[self._max_batch:]
            elif kind in ("audit", "claim", "notice") and until is not None:
                taken = [w for w in queued if w.order < until]
                left = [w for w in queued if w.order >= until]
            else:
                taken, left = queued, []
            self._queued[kind] = left
            writes.extend(taken)
        return writes

    def _requeue(self, writes):
        # In front of newer writes, for the next attempt.
        for kind in reversed(_ORDER):
            again = [w for w in writes if w.kind == kind]
            self._queued[kind][:0] = again

    def _flush(self):
        self._scheduled = None
        if self._in_flight is not None or not self._pending():
            self._notify_flushed()
            return
        self._in_flight = d = self._write(self._take())
        d.addCallback(self._done)

    def _write(self, writes):
        """
        Write C{writes} as one batch, or, when the store refuses its data, in
        halves (L{GroupCommit} docstring). Fires with C{False} when the store
        was unavailable (the unwritten writes are then requeued or failed),
        C{True} otherwise; never fails.
        """
        batch = _batch_of(writes, int(self._clock.seconds() * 1000))
        started = self._clock.seconds()
        d = defer.maybeDeferred(self._store.write_batch, batch)

        def observed(result):
            if self._metrics is not None:
                self._metrics.store_batch_seconds.observe(self._clock.seconds() - started)
                self._metrics.store_batch_size.observe(len(writes))
            return result

        def committed(outcome):
            if batch.notices and self.on_committed is not None:
                self.on_committed(batch.notices)
            enqueued, claimed = iter(outcome.enqueued), iter(outcome.claimed)
            for write in writes:
                if write.kind == "message":
                    write.waiter.callback(next(enqueued))
                elif write.kind == "claim":
                    write.waiter.callback(next(claimed))
            return True

        def failed(f):
            if f.check(StoreUnavailable):
                self._unavailable(writes, f)
                return False
            if len(writes) == 1:
                self._refused(writes[0], f)
                return True
            half = len(writes) // 2
            first = self._write(writes[:half])

            def second(ok):
                if not ok:
                    # The store went away meanwhile: the rest waits for it.
                    self._unavailable(writes[half:], f)
                    return False
                return self._write(writes[half:])

            return first.addCallback(second)

        d.addBoth(observed)
        d.addCallbacks(committed, failed)
        return d

    def _unavailable(self, writes, f):
        """
        The store is down: fail the messages (their senders learn it now)
        and the claims (their outboxes try again), and keep every other
        write for the next attempt.
        """
        answered = [w for w in writes if w.kind in _ANSWERED]
        self._log.warn(
            "the store is unavailable ({error}): {count} messages and claims refused, {other}"
            " other writes kept for the next attempt", error=f.getErrorMessage()[:200],
            count=len(answered), other=len(writes) - len(answered))
        for write in answered:
            write.waiter.errback(f)
        self._requeue([w for w in writes if w.kind not in _ANSWERED])

    def _refused(self, write, f):
        """
        The store refused this one write for its data: drop it alone.
        """
        self._log.error(
            "the store refused one {kind} write ({error}); it is dropped, the rest of "
            "its batch is written", kind=write.kind, error=f.getErrorMessage()[:200])
        if write.kind in _ANSWERED:
            write.waiter.errback(f)

    def _done(self, ok):
        self._in_flight = None
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
