"""
The outbox of one live session: an explicit state machine (automat) that
decides when the session's queued deliveries are claimed from the store and
pushed, and when a fresh message may be pushed to it at once.

The rule it keeps: per (sender, recipient, priority), deliveries reach the
session in C{seq} order. A fresh message may only go straight to a session
whose outbox is I{idle}: nothing is being claimed or waits to be pushed, so
nothing older can be overtaken. Otherwise the message is stored queued and
the outbox woken, and its next claim — queued behind the message in the
broker's one serial write queue (L{claudemesh.broker.groupcommit}) — finds
it.

States and transitions (every pair an input can meet is declared; an input
a state does not expect raises, which the tests pin down):

  ========  ============  ========  ========================================
  state     input         next      what happens
  ========  ============  ========  ========================================
  idle      wake          claiming  a claim is queued
  idle      take_fresh    idle      yes: the fresh delivery is leased here
  idle      writable      idle      nothing
  idle      close         closed
  claiming  wake          claiming  remember to claim again
  claiming  take_fresh    claiming  no: the caller queues it and wakes us
  claiming  claimed       pushing   the rows are kept and pushing starts
  claiming  claim_failed  idle      logged; the next wake tries again
  claiming  writable      claiming  nothing
  claiming  close         closed    (the claim's rows go back when it lands)
  pushing   resume        pushing   push rows while the socket takes them
  pushing   pushed        idle      claim again if told to, or if the claim
                                    was a full batch
  pushing   paused        paused    the socket's buffer is full
  pushing   wake          pushing   remember to claim again
  pushing   take_fresh    pushing   no
  pushing   writable      pushing   nothing
  pushing   close         closed    the rows left are dropped
  paused    writable      pushing   push the rest
  paused    wake          paused    remember to claim again
  paused    take_fresh    paused    no
  paused    close         closed    the rows left are dropped
  closed    claimed       closed    the rows go back (leased to nobody)
  closed    other inputs  closed    nothing
  ========  ============  ========  ========================================

The machine's data lives on its L{OutboxCore}: the claimed rows not yet
pushed, and C{again} — a wake arrived while a claim or a push was under way,
so the store may hold something the current claim did not see. Leases of
rows dropped at close are given back with the session's own (the session
ends or enters grace, and its leases are released in the store).
"""

import collections
from typing import Protocol

import attr
from automat import TypeMachineBuilder
from twisted.logger import Logger

_log = Logger()


class Outbox(Protocol):
    """
    The inputs of one session's outbox.
    """

    def wake(self) -> None:
        """
        The store may hold deliveries this session can take now (it
        connected, turned idle, joined a group, a lease ended, a release or a
        fresh message was queued).
        """

    def take_fresh(self) -> bool:
        """
        May a fresh delivery be leased to this session and pushed at once?
        """

    def claimed(self, rows: list) -> None:
        """
        The claim came back with these L{ClaimedDelivery} rows (maybe none).
        """

    def claim_failed(self) -> None:
        """
        The claim failed (the store is down).
        """

    def resume(self) -> None:
        """
        Push the claimed rows (fed by the outbox itself).
        """

    def pushed(self) -> None:
        """
        Every claimed row was pushed (fed by the outbox itself).
        """

    def paused(self) -> None:
        """
        The connection's buffer filled before every row was pushed (fed by
        the outbox itself).
        """

    def writable(self) -> None:
        """
        The connection's buffer drained.
        """

    def close(self) -> None:
        """
        The connection is gone.
        """

    def state(self) -> str:
        """
        The name of the current state (for logs and tests).
        """


@attr.s(auto_attribs=True)
class OutboxCore:
    """
    What an outbox acts on, given by L{claudemesh.broker.delivery}.

    @ivar claim: queue a claim for the session; returns a L{Deferred}
        firing with the claimed rows once the claim committed.
    @ivar push: write one claimed row to the connection; C{False} when the
        connection is no longer open.
    @ivar is_paused: is the connection's outbound buffer full?
    @ivar hand_back: give back rows claimed for a session that is gone.
    @ivar batch_limit: the claim's row limit: a full batch means more may
        wait.
    @ivar rows: claimed rows not yet pushed.
    @ivar again: a wake arrived since the current claim started.
    """

    claim: object
    push: object
    is_paused: object
    hand_back: object
    batch_limit: int
    rows: collections.deque = attr.Factory(collections.deque)
    again: bool = False


def _start_claim(outbox, core):
    core.again = False

    def failed(failure):
        _log.failure("claiming deliveries failed", failure)
        outbox.claim_failed()

    core.claim().addCallbacks(outbox.claimed, failed)


def _keep_rows(outbox, core, rows):
    core.rows = collections.deque(rows)
    if len(rows) >= core.batch_limit:
        # A full batch: the store may hold more for this session.
        core.again = True
    # Runs once this transition is done (automat queues an input fed from
    # an output), in the pushing state.
    outbox.resume()


def _push_rows(outbox, core):
    rows = core.rows
    while rows:
        if core.is_paused():
            outbox.paused()
            return
        if not core.push(rows.popleft()):
            # The connection went away under us; its close is on its way.
            return
    outbox.pushed()


def _pushed(outbox, core):
    if core.again:
        outbox.wake()


def _remember(outbox, core):
    core.again = True


def _drop_rows(outbox, core):
    core.rows.clear()


def _resume(outbox, core):
    outbox.resume()


def _hand_back(outbox, core, rows):
    if rows:
        core.hand_back(rows)


def _nothing(outbox, core, *args):
    return None


_builder = TypeMachineBuilder(Outbox, OutboxCore)
idle = _builder.state("idle")
claiming = _builder.state("claiming")
pushing = _builder.state("pushing")
paused = _builder.state("paused")
closed = _builder.state("closed")

for _state, _name in ((idle, "idle"), (claiming, "claiming"), (pushing, "pushing"),
                      (paused, "paused"), (closed, "closed")):
    _state.upon(Outbox.state).loop().returns(_name)

idle.upon(Outbox.wake).to(claiming)(_start_claim)
idle.upon(Outbox.take_fresh).loop().returns(True)
idle.upon(Outbox.writable).loop()(_nothing)
idle.upon(Outbox.close).to(closed)(_nothing)

claiming.upon(Outbox.wake).loop()(_remember)
claiming.upon(Outbox.take_fresh).loop().returns(False)
claiming.upon(Outbox.claimed).to(pushing)(_keep_rows)
claiming.upon(Outbox.claim_failed).to(idle)(_nothing)
claiming.upon(Outbox.writable).loop()(_nothing)
claiming.upon(Outbox.close).to(closed)(_nothing)

pushing.upon(Outbox.resume).loop()(_push_rows)
pushing.upon(Outbox.pushed).to(idle)(_pushed)
pushing.upon(Outbox.paused).to(paused)(_nothing)
pushing.upon(Outbox.wake).loop()(_remember)
pushing.upon(Outbox.take_fresh).loop().returns(False)
pushing.upon(Outbox.writable).loop()(_nothing)
pushing.upon(Outbox.close).to(closed)(_drop_rows)

paused.upon(Outbox.writable).to(pushing)(_resume)
paused.upon(Outbox.wake).loop()(_remember)
paused.upon(Outbox.take_fresh).loop().returns(False)
paused.upon(Outbox.close).to(closed)(_drop_rows)

closed.upon(Outbox.claimed).loop()(_hand_back)
closed.upon(Outbox.wake).loop()(_nothing)
closed.upon(Outbox.take_fresh).loop().returns(False)
closed.upon(Outbox.claim_failed).loop()(_nothing)
closed.upon(Outbox.writable).loop()(_nothing)
closed.upon(Outbox.close).loop()(_nothing)

new_outbox = _builder.build()
