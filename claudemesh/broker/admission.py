"""
What a TCP connection must do to keep its place, from the moment it is
accepted: against slow or idle clients holding slots (slowloris, issue 11).

  - Per-address limits count the connection from accept
    (C{--max-connections-per-ip}), not only once it is a WebSocket: past the
    cap, or while the address is penalised for flooding, the connection is
    answered HTTP 429 and closed before any request is read. A connection
    from a trusted proxy is counted later, by the address the proxy names
    (L{claudemesh.broker.ws.AdmittingWebSocketResource}).
  - A header deadline (C{--header-timeout-seconds}): a request's headers must
    be complete within that many seconds of accept, or of the previous
    answer on a kept-alive connection; otherwise HTTP 408 and close (a
    connection that sent nothing of a next request is closed without an
    answer). One header line every few seconds no longer keeps a connection
    open.
  - A body limit (C{--max-message-bytes}): a request declaring a longer body
    is answered 413 at once, before any of the body is read; one without a
    declared length is answered 413 as soon as it passes the limit; nothing
    beyond the limit is kept.

The hello deadline that follows the upgrade is the WebSocket protocol's
(L{claudemesh.broker.ws.BrokerServerProtocol}).
"""

import io
import json

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.web import server


def _raw_answer(code, reason, document):
    """
    A complete HTTP/1.1 answer with a JSON body that closes the connection,
    for clients answered outside twisted.web's request handling.
    """
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (code, reason, len(body), body))


TIMED_OUT = _raw_answer(408, b"Request Timeout", {"error": "request_timeout"})
TOO_LARGE = _raw_answer(413, b"Payload Too Large", {"ok": False, "error": "payload too large"})


class RefusedConnection(Protocol):
    """
    A connection refused at accept: answered 429 with the reason, closed.
    """

    def __init__(self, reason):
        self._reason = reason

    def connectionMade(self):
        self.transport.write(_raw_answer(429, b"Too Many Requests", {"error": self._reason}))
        self.transport.loseConnection()

    def dataReceived(self, data):
        # Whatever it sends is not read.
        pass


class AdmittedConnection(policies.ProtocolWrapper):
    """
    The wrapper around one accepted connection for its whole life: it holds
    the connection's place in the per-address count, and runs the header
    deadline. It stays in place when the connection becomes a WebSocket
    (Autobahn then swaps the protocol it wraps), so the count is released
    however and whenever the connection ends.

    @ivar counted: the address this connection is counted under, or C{None}
        (a trusted proxy's connection, counted at the upgrade).
    """

    _log = Logger()

    def __init__(self, admission, wrapped, counted):
        policies.ProtocolWrapper.__init__(self, admission, wrapped)
        self.counted = counted
        self._deadline = None
        # Whether a byte of the next request arrived since the deadline was
        # armed: an idle kept-alive connection is closed without an answer
        # (a client could take a 408 for the answer to its next request).
        self._begun = False

    def connectionMade(self):
        self._arm()

    def dataReceived(self, data):
        self._begun = True
        policies.ProtocolWrapper.dataReceived(self, data)

    def _arm(self):
        timeout = self.factory.header_timeout
        if timeout and self._deadline is None and self.transport is not None:
            self._begun = False
            self._deadline = self.factory.clock.callLater(timeout, self._too_slow)

    def _disarm(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def headers_received(self):
        """
        A request's headers are complete: the deadline is met.
        """
        self._disarm()

    def answered(self):
        """
        A request was answered: the next one (on a kept-alive connection)
        has the deadline again.
        """
        self._arm()

    def _too_slow(self):
        self._deadline = None
        if self._begun:
            self.factory.count_rejected("header_timeout")
            self.transport.write(TIMED_OUT)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._disarm()
        if self.counted is not None:
            self.factory.limits.release(self.counted)
            self.counted = None
        policies.ProtocolWrapper.connectionLost(self, reason)


def admission_of(channel):
    """
    The L{AdmittedConnection} an HTTP channel runs in, or C{None}.
    """
    transport = getattr(channel, "transport", None)
    return transport if isinstance(transport, AdmittedConnection) else None


class Admission(policies.WrappingFactory):
    """
    Admits the connections of one L{twisted.web.server.Site}: it wraps each
    channel the site builds in an L{AdmittedConnection} (this factory is
    the wrappers' registry; the site stays the listening factory).

    @param limits: the broker's L{claudemesh.broker.limits.AddressLimits}, or
        C{None} for no per-address counting.
    @param count_rejected: called with the reason of each refusal (metrics).
    """

    protocol = AdmittedConnection

    def __init__(self, clock, header_timeout, limits=None, count_rejected=None):
        policies.WrappingFactory.__init__(self, None)
        self.clock = clock
        self.header_timeout = header_timeout
        self.limits = limits
        self._count_rejected = count_rejected

    def count_rejected(self, reason):
        if self._count_rejected is not None:
            self._count_rejected(reason)

    def wrap(self, channel, addr):
        """
        The protocol to run for a connection from C{addr}: C{channel}
        wrapped, or a L{RefusedConnection}.
        """
        host = getattr(addr, "host", None) or "unix"
        counted = None
        limits = self.limits
        if limits is not None and not limits.is_trusted_proxy(host):
            refusal = limits.accept(host)
            if refusal is not None:
                self.count_rejected(refusal)
                return RefusedConnection(refusal)
            counted = host
        return AdmittedConnection(self, channel, counted)


class BrokerRequest(server.Request):
    """
    A request of the broker's site: its headers meet the connection's
    deadline, its answer re-arms it, and its body is held to the site's
    C{max_body_bytes}.
    """

    _refused = False
    _body_bytes = 0

    def _limit(self):
        return getattr(self.channel.site, "max_body_bytes", 0)

    def gotLength(self, length):
        admitted = admission_of(self.channel)
        if admitted is not None:
            admitted.headers_received()
        limit = self._limit()
        if limit and length is not None and length > limit:
            # Refused on the declared length: none of the body is read.
            self._refuse_too_large()
            return
        if limit:
            # Bodies are small: kept in memory, never in a temporary file.
            self.content = io.BytesIO()
        else:
            server.Request.gotLength(self, length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body_bytes += len(data)
        limit = self._limit()
        if limit and self._body_bytes > limit:
            self._refuse_too_large()
            return
        server.Request.handleContentChunk(self, data)

    def _refuse_too_large(self):
        self._refused = True
        self.content = io.BytesIO()
        # No "100 Continue" after the refusal.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        channel.transport.write(TOO_LARGE)
        channel.loseConnection()

    def finish(self):
        channel = self.channel
        server.Request.finish(self)
        admitted = admission_of(channel)
        if admitted is not None:
            admitted.answered()
