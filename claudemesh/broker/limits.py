"""
Per-address limits, applied before the WebSocket upgrade: open connections
per address (C{--max-connections-per-ip}) and new connections per address and
second (C{--hello-rate-per-ip}), and a 10 s ban on new connections from an
address one of whose connections was closed for flooding. A refusal is an
HTTP 429 answer to the upgrade request, so a flood costs the broker no
WebSocket session.

The address is the TCP peer's, unless that peer is a trusted proxy
(C{--trusted-proxy}): then it is the last address its C{X-Forwarded-For}
names (the one the proxy itself saw). A client cannot spoof its way around
the limits by sending that header itself.
"""

import ipaddress

from claudemesh.broker.ratelimit import TokenBuckets


def peer_host(peer):
    """
    The host of an Autobahn peer string (C{tcp:1.2.3.4:5678},
    C{tcp6:::1:5678}, C{unix}...).
    """
    kind, _, rest = peer.partition(":")
    if kind in ("tcp", "tcp4", "tcp6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


class AddressLimits:
    def __init__(self, clock, max_connections, hello_rate_per_second, trusted_proxies=()):
        self._clock = clock
        self._max = max_connections
        self._rate = TokenBuckets(clock, hello_rate_per_second, hello_rate_per_second * 60)
        self._proxies = tuple(ipaddress.ip_network(p) for p in trusted_proxies)
        self._open = {}
        # address -> time until which its new connections are refused.
        self._penalties = {}

    @property
    def enabled(self) -> bool:
        return bool(self._max) or self._rate.enabled

    def penalise(self, address, seconds):
        """
        Refuse new connections from C{address} for C{seconds}: one of its
        connections was closed for flooding, and reconnecting to flood again
        should cost the broker no more than a 429. Only while per-address
        limits are on (behind an untrusted proxy every client shares one
        address, and the operator turned them off for that reason).
        """
        if self.enabled:
            self._penalties[address] = self._clock.seconds() + seconds

    def client_address(self, peer, forwarded_for):
        """
        The address the limits count: the peer's, or the one a trusted proxy
        says it serves.
        """
        return self.address_of(peer_host(peer), forwarded_for)

    def address_of(self, host, forwarded_for):
        """
        L{client_address} for a peer's host.
        """
        if forwarded_for and self._trusted(host):
            hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
            if hops:
                return hops[-1]
        return host

    def is_trusted_proxy(self, host):
        """
        Whether C{host} is a trusted proxy (its connections are counted by
        the address its C{X-Forwarded-For} names, at the upgrade).
        """
        return self._trusted(host)

    def _trusted(self, host):
        if not self._proxies:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def _penalised(self, address):
        until = self._penalties.get(address)
        if until is not None:
            if self._clock.seconds() < until:
                return True
            del self._penalties[address]
        return False

    def accept(self, address):
        """
        Count a connection accepted from C{address} (of any kind, from its
        first byte on), or say why it is refused (C{"flood"} or
        C{"too_many_connections"}).
        """
        if self._penalised(address):
            return "flood"
        if self._max and self._open.get(address, 0) >= self._max:
            return "too_many_connections"
        self._open[address] = self._open.get(address, 0) + 1
        return None

    def admit(self, address, counted=False):
        """
        Admit a WebSocket upgrade from C{address}, counting it unless it was
        C{counted} at accept already, or say why it is refused (C{"flood"},
        C{"too_many_connections"} or C{"rate_limited"}).
        """
        if self._penalised(address):
            return "flood"
        if not counted and self._max and self._open.get(address, 0) >= self._max:
            return "too_many_connections"
        if not self._rate.take(address):
            return "rate_limited"
        if not counted:
            self._open[address] = self._open.get(address, 0) + 1
        return None

    def release(self, address):
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def open_connections(self, address):
        return self._open.get(address, 0)

    def sweep(self):
        self._rate.sweep()
        now = self._clock.seconds()
        for address in [a for a, until in self._penalties.items() if until <= now]:
            del self._penalties[address]
