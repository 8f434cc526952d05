"""
Replay memory: every signed credential is accepted once.

Hellos, hook requests, mesh creations and joins carry a signature over a
string with a timestamp, accepted within 60 s of the broker's clock. Within
that window the same signature could be sent again by whoever captured it
(issue 11: a replayed hello replaced its victim's session). The broker
therefore remembers each (kind, signer key, signature) it accepted until
its timestamp leaves the window, and refuses a second use with
C{replayed}.

L{IReplayMemory} is the seam: L{LocalReplayMemory} remembers in this
process, which is enough for one broker; brokers sharing a database (issue
15) use L{SharedReplayMemory}, which asks this process first and then the
store's table of used signatures, so a credential used at one node is
refused at every other.
"""

import heapq

from twisted.internet import defer
from zope.interface import Interface, implementer


class IReplayMemory(Interface):
    """
    Where the broker remembers the signatures it accepted.
    """

    def first_use(kind, signer, signature, expires_at):
        """
        Record one use of C{signature} by key C{signer} for a credential of
        C{kind} (C{"hello"}, C{"hook"}, ...), remembered until C{expires_at}
        (ms since the epoch, when the credential's timestamp leaves the
        accepted window).

        @return: a L{Deferred} firing with C{True} for the first use and
            C{False} for any later one before C{expires_at}.
        """


@implementer(IReplayMemory)
class LocalReplayMemory:
    """
    An L{IReplayMemory} in this process's memory. Each entry lives at most
    two skew windows (a timestamp may be up to one window ahead), so memory
    is bounded by the rate of accepted credentials, which the per-address
    and per-member rate limits bound in turn.
    """

    def __init__(self, clock):
        self._clock = clock
        self._seen = {}
        # (expires_at, key), earliest first: what to forget next.
        self._expiries = []

    def __len__(self):
        return len(self._seen)

    def first_use(self, kind, signer, signature, expires_at):
        now = int(self._clock.seconds() * 1000)
        self._forget(now)
        key = (kind, signer, signature)
        if key in self._seen:
            return defer.succeed(False)
        self._seen[key] = expires_at
        heapq.heappush(self._expiries, (expires_at, key))
        return defer.succeed(True)

    def _forget(self, now):
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, key = heapq.heappop(expiries)
            self._seen.pop(key, None)


@implementer(IReplayMemory)
class SharedReplayMemory:
    """
    An L{IReplayMemory} shared by the nodes of a cluster: this process's
    memory first (a replay here costs no round trip), then the store's
    C{used_signatures} (L{IStore.use_signature}), which answers for every
    node. A store that cannot answer refuses the credential (the caller
    fails as it would for any store outage), never lets it through twice.
    """

    def __init__(self, clock, store):
        self._clock = clock
        self._store = store
        self._local = LocalReplayMemory(clock)

    def first_use(self, kind, signer, signature, expires_at):
        d = self._local.first_use(kind, signer, signature, expires_at)

        def shared(fresh):
            if not fresh:
                return False
            return self._store.use_signature(kind, signer, signature, expires_at,
                                             int(self._clock.seconds() * 1000))

        return d.addCallback(shared)
