"""
Token buckets on an injected clock, keyed by whatever the caller limits
(a member, a hook key, an address).
"""


class TokenBuckets:
    """
    Buckets of C{capacity} tokens refilled at C{per_minute} tokens a minute.
    A capacity or rate of 0 turns the limit off.
    """

    def __init__(self, clock, capacity, per_minute, idle_seconds=600):
        self._clock = clock
        self._capacity = capacity
        self._rate = per_minute / 60.0
        self._idle = idle_seconds
        self._buckets = {}

    @property
    def enabled(self) -> bool:
        return self._capacity > 0 and self._rate > 0

    def take(self, key) -> bool:
        """
        Take one token for C{key}; C{False} when its bucket is empty.
        """
        if not self.enabled:
            return True
        now = self._clock.seconds()
        tokens, last = self._buckets.get(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def sweep(self):
        """
        Forget buckets idle long enough to be full again, so memory stays
        bounded by the active keys.
        """
        now = self._clock.seconds()
        for key in [k for k, (_, last) in self._buckets.items() if now - last > self._idle]:
            del self._buckets[key]

    def __len__(self):
        return len(self._buckets)
