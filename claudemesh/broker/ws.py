"""
The WebSocket protocol at C{/ws}: decode, validate, dispatch to the broker
core, send the reply. Thin on purpose; the rules live in the core's parts
(L{claudemesh.broker.core}), and the dispatcher here is the one place that
notes a session's activity and turns refusals into C{error} frames.

Every frame is answered when it is wrong: C{error malformed} naming the
field, C{error unknown_type}, C{error no_hello} before a successful hello. A
connection that keeps sending bad frames, or sends refused by its rate limit
(L{ERROR_FLOOD_COUNT} within L{ERROR_FLOOD_SECONDS}), is closed with 1008
C{flood}; a frame larger than the
configured maximum is closed by Autobahn with 1009.
"""

import collections

from autobahn.exception import PayloadExceededError
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from claudemesh import __version__, protocol
from claudemesh.broker import framemask
from claudemesh.broker.admission import admission_of
from claudemesh.broker.limits import AddressLimits
from claudemesh.broker.sessions import IPeerConnection
from claudemesh.store.interface import StoreUnavailable

ERROR_FLOOD_COUNT = 100
ERROR_FLOOD_SECONDS = 10.0
# How long an address that flooded is refused new connections (HTTP 429).
FLOOD_PENALTY_SECONDS = 10.0
LIMITS_SWEEP_SECONDS = 60.0

@implementer(IPeerConnection)
class BrokerServerProtocol(WebSocketServerProtocol):
    # Autobahn already uses .log on protocols.
    _log = Logger()

    def __init__(self):
        WebSocketServerProtocol.__init__(self)
        self._session = None
        self._hello_running = False
        self._errors = collections.deque()
        self.peer_address = None
        self._address = None
        # Whether this protocol counted its address (and releases it); one
        # counted at accept is released by its AdmittedConnection.
        self._owns_count = True
        self._hello_deadline = None
        self._paused = False
        self._paused_bytes = 0

    # -- IPeerConnection ---------------------------------------------------------

    @property
    def paused(self):
        """
        Whether the outbound buffer is full (the core then holds back what
        it can: claimed deliveries wait for L{_Backpressure.resumeProducing}).
        """
        return self._paused

    def send(self, frame):
        try:
            self.send_encoded(protocol.encode(frame))
        except PayloadExceededError:
            # Replies are paged to fit (claudemesh.broker.pages); should one
            # still not, the client learns it, and nothing else breaks.
            self._log.warn("a {type} reply was too large to send", type=frame.get("type"))
            self.send_encoded(protocol.encode(protocol.error_frame(
                "reply_too_large", "the reply does not fit in a frame",
                frame.get("_reqId"))))

    def send_encoded(self, payload):
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if self._paused:
            # The peer stopped reading and the transport's buffer is full:
            # what we write now only grows our memory. Past the cap the
            # connection goes; its deliveries stay queued for its return.
            self._paused_bytes += len(payload)
            cap = self.factory.max_outbound_buffer_bytes
            if cap and self._paused_bytes > cap:
                self._log.info("closing a slow consumer at {peer}", peer=self.peer_address)
                session = self._session
                if session is not None:
                    self.factory.broker.presence.end_connection(
                        session, protocol.CLOSE_SLOW_CONSUMER, "slow_consumer", "grace")
                else:
                    self.close(protocol.CLOSE_SLOW_CONSUMER, "slow_consumer")
                return
        self.sendMessage(payload, isBinary=False)

    def close(self, code, reason):
        # sendClose() only accepts 1000 and 3000-4999; the protocol also
        # needs 1001 and 1008, which sendCloseFrame() writes as given.
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])

    # -- Autobahn callbacks ------------------------------------------------------

    def onConnect(self, request):
        if self._address is None:
            # Not admitted by AdmittingWebSocketResource (a factory used on
            # its own): check the limits here, as Autobahn's refusal.
            limits = self.factory.limits
            address = limits.client_address(request.peer, request.headers.get("x-forwarded-for"))
            refusal = limits.admit(address)
            if refusal is not None:
                self.factory.broker.presence.count_rejected(refusal)
                # Answered as HTTP 429 before the upgrade.
                raise ConnectionDeny(429, refusal)
            self._address = address
        self.peer_address = self._address
        return None

    def onOpen(self):
        # A WebSocket holds a slot: it must say a successful hello soon.
        timeout = self.factory.hello_timeout
        if timeout:
            self._hello_deadline = self.factory.clock.callLater(timeout, self._no_hello)
        # Flow control: the transport tells a registered streaming producer
        # when its buffer fills (the peer stopped reading) and drains. The
        # HTTP channel that did the upgrade is registered there; take over.
        transport = self.transport
        try:
            transport.unregisterProducer()
            transport.registerProducer(_Backpressure(self), True)
        except Exception:
            self._log.failure("cannot watch this connection's outbound buffer")

    def onMessage(self, payload, isBinary):
        try:
            self._received(payload, isBinary)
        except Exception:
            self._log.failure("handling a frame failed")
            self._error(protocol.Refusal("internal", "the broker failed on this frame"))

    def onClose(self, wasClean, code, reason):
        self._cancel_hello_deadline()
        if self._address is not None:
            if self._owns_count:
                self.factory.limits.release(self._address)
            self._address = None
        session = self._session
        if session is not None:
            self._session = None
            # A close frame from the client with 1000 or 1001 is a deliberate
            # goodbye; anything else (a drop, a timeout) may come back.
            clean = bool(wasClean) and code in (1000, 1001) and not self.closedByMe
            try:
                self.factory.broker.presence.connection_lost(session, self, clean)
            except Exception:
                self._log.failure("ending a session failed")

    # -- dispatch ------------------------------------------------------------------

    def _received(self, payload, is_binary):
        limit = self.factory.max_message_bytes
        if limit and len(payload) > limit:
            # A fragmented message may pass Autobahn's own (outbound-sized)
            # message limit; it is still too big.
            self.close(protocol.CLOSE_TOO_BIG, "message too big")
            return
        if is_binary:
            self._error(protocol.Refusal("malformed", "binary frames are not accepted"))
            return
        try:
            frame = protocol.decode(payload.decode("utf-8"))
        except UnicodeDecodeError:
            self._error(protocol.Refusal("malformed", "frame is not UTF-8"))
            return
        except protocol.Refusal as e:
            self._error(e)
            return
        session = self._session
        if session is None:
            if frame.TYPE == "hello" and not self._hello_running:
                self._hello(frame)
            elif frame.TYPE == "join":
                self._join(frame)
            else:
                self._error(protocol.Refusal(
                    "no_hello", "must send hello first", req_id=frame_req_id(frame)))
            return
        if frame.TYPE == "hello":
            self._error(protocol.Refusal(
                "invalid", "hello already done on this connection", req_id=frame_req_id(frame)))
            return
        handler = self.factory.handlers.get(frame.TYPE)
        if handler is None:
            # join: only before hello (found by tests/test_fuzz.py).
            self._error(protocol.Refusal(
                "invalid", "%s is only accepted before hello" % (frame.TYPE,),
                req_id=frame_req_id(frame)))
            return
        # Every application frame counts as activity ("stale" counts from
        # the last one).
        session.last_active_at = int(self.factory.clock.seconds() * 1000)
        d = defer.maybeDeferred(handler, session, frame)
        d.addCallbacks(self._reply, self._refused, callbackArgs=(frame,),
                       errbackArgs=(frame,))
        d.addErrback(self._failed, frame)

    def _no_hello(self):
        self._hello_deadline = None
        if self._session is None and self.state == WebSocketServerProtocol.STATE_OPEN:
            self.factory.broker.presence.count_rejected("hello_timeout")
            self.send(protocol.error_frame(
                "hello_timeout", "no hello within %d s" % (self.factory.hello_timeout,)))
            self.close(protocol.CLOSE_POLICY, "hello_timeout")

    def _cancel_hello_deadline(self):
        if self._hello_deadline is not None:
            if self._hello_deadline.active():
                self._hello_deadline.cancel()
            self._hello_deadline = None

    def _hello(self, frame):
        self._hello_running = True
        presence = self.factory.broker.presence
        d = presence.hello(self, frame)

        def accepted(result):
            self._hello_running = False
            session, ack = result
            if self.state != WebSocketServerProtocol.STATE_OPEN:
                # The client left while we checked it.
                presence.connection_lost(session, self, clean=False)
                return
            self._session = session
            self._cancel_hello_deadline()
            self._reply(ack, frame)
            presence.ready(session)

        def refused(f):
            self._hello_running = False
            f.trap(protocol.Refusal)
            refusal = f.value
            self.send(refusal.frame(frame._reqId))
            if refusal.close is not None:
                self.close(*refusal.close)

        d.addCallbacks(accepted, refused)
        d.addErrback(self._hello_failed)

    def _join(self, frame):
        d = self.factory.broker.membership.join(frame)

        def joined(result):
            self._reply(protocol.JoinAck(**result).to_wire(), frame)

        def refused(f):
            f.trap(protocol.Refusal)
            refusal = f.value
            self._error(refusal, frame_req_id(frame))
            if refusal.close is not None:
                self.close(*refusal.close)

        d.addCallbacks(joined, refused)
        d.addErrback(self._failed, frame)

    def _hello_failed(self, f):
        self._hello_running = False
        self._log.failure("hello failed", f)
        self.send(protocol.error_frame("unavailable", "the broker cannot take hellos right now"))
        self.close(1011, "internal error")

    def _reply(self, result, frame):
        if result is None:
            return
        req_id = frame_req_id(frame)
        if req_id is not None:
            result["_reqId"] = req_id
        self.send(result)
        if result.get("queued") is False and result.get("error", "").startswith("rate_limit"):
            # A sender that keeps going past its rate limit is flooding: its
            # refused sends count toward the same 1008 close as bad frames,
            # so it stops costing the broker (and its peers) every frame.
            self._count_error()

    def _refused(self, f, frame):
        f.trap(protocol.Refusal)
        self._error(f.value, frame_req_id(frame))

    def _failed(self, f, frame):
        """
        A request failed for a reason of the broker's own (the store, a
        bug): log it, and tell the client the request was not done.
        """
        if f.check(StoreUnavailable):
            self._log.warn("a {type} request failed: {error}", type=frame.TYPE, error=f.value)
            code, message = "store_unavailable", "the broker cannot reach its store right now"
        else:
            self._log.failure("a {type} request failed", f, type=frame.TYPE)
            code, message = "internal", "the broker could not complete this request"
        self.send(protocol.error_frame(code, message, frame_req_id(frame)))

    def _error(self, refusal, req_id=None):
        """
        Answer a refused frame with its C{error} frame, and count it toward
        the error flood.
        """
        metrics = self.factory.broker.metrics
        if metrics is not None:
            metrics.frame_errors.labels(refusal.code).inc()
        self.send(refusal.frame(req_id))
        self._count_error()

    def _count_error(self):
        """
        Count one refused frame; past L{ERROR_FLOOD_COUNT} within
        L{ERROR_FLOOD_SECONDS} the connection is closed 1008 C{flood}.
        """
        now = self.factory.clock.seconds()
        errors = self._errors
        errors.append(now)
        while errors and errors[0] <= now - ERROR_FLOOD_SECONDS:
            errors.popleft()
        if len(errors) >= ERROR_FLOOD_COUNT:
            if self._address is not None:
                self.factory.limits.penalise(self._address, FLOOD_PENALTY_SECONDS)
            self.close(protocol.CLOSE_POLICY, protocol.REASON_FLOOD)


def outbound_limit(max_message_bytes):
    """
    The largest frame the broker sends when it accepts frames of
    C{max_message_bytes} (0: no limit).
    """
    if not max_message_bytes:
        return 0
    return max_message_bytes + protocol.PUSH_ENVELOPE_BYTES


def configure_ws_factory(factory, settings):
    """
    Apply the broker's WebSocket options to an Autobahn server factory.

    @param factory: a L{WebSocketServerFactory}.
    @param settings: the L{claudemesh.broker.settings.BrokerSettings}.
    """
    # Autobahn's per-frame native masker costs more than the frame itself.
    framemask.install()
    factory.setProtocolOptions(
        # Liveness (docs/protocol.md, connection limits): ping every 30 s,
        # drop a peer silent for 75 s.
        autoPingInterval=settings.auto_ping_interval,
        autoPingTimeout=settings.auto_ping_timeout,
        # Autobahn drops TCP on a protocol violation by default, which the
        # peer sees as 1006; we want it to see the real 1008/1009 close.
        failByDrop=False,
        # Autobahn applies one message limit both ways. Outbound, a push is
        # larger than the send that carried it: the limit leaves room for
        # its envelope, so a send accepted at the inbound limit can always
        # be pushed (issue 11). Inbound, frames are held to the limit by
        # maxFramePayloadSize and whole messages by BrokerServerProtocol.
        maxMessagePayloadSize=outbound_limit(settings.max_message_bytes),
        maxFramePayloadSize=settings.max_message_bytes,
        # The protocol decodes every text frame itself (and answers `error
        # malformed` when it is not UTF-8); a second validation pass in
        # Autobahn costs CPU on every frame for nothing.
        utf8validateIncoming=False,
        # A plain GET /ws gets "426 Upgrade Required" instead of Autobahn's
        # HTML status page (which also advertises the Autobahn version).
        webStatus=False,
    )


@implementer(IPushProducer)
class _Backpressure:
    """
    Told by the transport when its outbound buffer is full (the peer does
    not read) and when it drained.
    """

    def __init__(self, protocol):
        self._protocol = protocol

    def pauseProducing(self):
        self._protocol._paused = True

    def resumeProducing(self):
        protocol_ = self._protocol
        protocol_._paused = False
        protocol_._paused_bytes = 0
        session = protocol_._session
        if session is not None:
            try:
                protocol_.factory.broker.delivery.writable(session)
            except Exception:
                protocol_._log.failure("pushing held deliveries failed")

    def stopProducing(self):
        pass


class AdmittingWebSocketResource(WebSocketResource):
    """
    C{/ws}: the per-address limits are checked on the HTTP request, and a
    refusal answered 429 by twisted.web, before Autobahn takes the connection
    over (and parses the handshake again): a flood of upgrades costs as little
    as a flood of plain requests.
    """

    def __init__(self, factory):
        WebSocketResource.__init__(self, factory)
        self._ws_factory = factory

    def render(self, request):
        factory = self._ws_factory
        forwarded = request.getHeader(b"x-forwarded-for")
        address = factory.limits.address_of(
            getattr(request.getClientAddress(), "host", "unix"),
            forwarded.decode("latin-1") if forwarded else None)
        # Counted from accept already (claudemesh.broker.admission), unless
        # it came through a trusted proxy: then it counts here, by the
        # address the proxy names.
        admitted = admission_of(request.channel)
        counted = admitted is not None and admitted.counted == address
        refusal = factory.limits.admit(address, counted)
        if refusal is not None:
            factory.broker.presence.count_rejected(refusal)
            request.setResponseCode(429)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"connection", b"close")
            # A refused client gets its answer and loses the connection, as
            # a refused upgrade should (twisted.web would keep it alive).
            channel = request.channel
            request.notifyFinish().addBoth(lambda _: channel.loseConnection())
            return b'{"error":"%s"}' % (refusal.encode("ascii"),)
        # Autobahn builds the protocol within this call: it takes the
        # address, and the count when it was made here.
        factory.admitted = (address, not counted)
        try:
            return WebSocketResource.render(self, request)
        finally:
            if factory.admitted is not None and not counted:
                # No protocol took it (the upgrade did not start).
                factory.limits.release(address)
            factory.admitted = None


def frame_req_id(frame):
    return getattr(frame, "_reqId", None)


class BrokerServerFactory(WebSocketServerFactory):
    """
    Builds L{BrokerServerProtocol}s bound to one broker core.
    """

    protocol = BrokerServerProtocol

    def __init__(self, broker, clock, settings, url=None):
        WebSocketServerFactory.__init__(
            self, url, server="claudemesh/" + __version__, reactor=clock)
        self.broker = broker
        # Frame type -> the bound method of the core part that answers it.
        self.handlers = broker.handlers()
        # The error-flood window reads this clock so tests can drive it.
        self.clock = clock
        self.noisy = False
        self.max_outbound_buffer_bytes = settings.max_outbound_buffer_bytes
        self.max_message_bytes = settings.max_message_bytes
        self.limits = AddressLimits(clock, settings.max_connections_per_ip,
                                    settings.hello_rate_per_ip, settings.trusted_proxies)
        configure_ws_factory(self, settings)
        self._limits_sweep = None
        # (address, whether the protocol releases its count) admitted by
        # AdmittingWebSocketResource, for the protocol built next.
        self.admitted = None
        self.hello_timeout = settings.hello_timeout_seconds

    def buildProtocol(self, addr):
        protocol = WebSocketServerFactory.buildProtocol(self, addr)
        if self.admitted is not None:
            protocol._address, protocol._owns_count = self.admitted
        self.admitted = None
        return protocol

    def startFactory(self):
        WebSocketServerFactory.startFactory(self)
        # Forget per-address state of addresses gone quiet, so memory stays
        # bounded by the active ones.
        self._limits_sweep = task.LoopingCall(self.limits.sweep)
        self._limits_sweep.clock = self.clock
        self._limits_sweep.start(LIMITS_SWEEP_SECONDS, now=False)

    def stopFactory(self):
        if self._limits_sweep is not None and self._limits_sweep.running:
            self._limits_sweep.stop()
        self._limits_sweep = None
        WebSocketServerFactory.stopFactory(self)
