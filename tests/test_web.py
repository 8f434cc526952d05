"""
Tests for L{claudemesh.broker.web}: the routes on the broker's port, the
store health behind /health/ready, and /ws over a real socket.
"""

import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from claudemesh import __version__
from claudemesh.broker.core import Broker
from claudemesh.broker.settings import BrokerSettings
from claudemesh.broker.web import (
    PING_TIMEOUT_SECONDS,
    StoreHealth,
    make_site,
)
from claudemesh.broker.ws import BrokerServerFactory
from claudemesh.store.interface import StoreUnavailable
from tests.clientfixture import TrackedServerProtocol
from tests.meshfixture import inline_store

# A realistic wall clock (2026-11-28T...) with a fractional part, so that the
# integer conversions of uptime and serverTime are visible.
START = 1_795_000_000.25


class FakeStore:
    """
    A store whose reachability the test decides; only C{ping} exists.
    """

    kind = "fake"

    def __init__(self):
        self.reachable = True
        self.hanging = False
        self.pings = 0

    def ping(self):
        self.pings += 1
        if self.hanging:
            return Deferred()
        if self.reachable:
            return succeed(None)
        return fail(StoreUnavailable("connection refused"))


def broker_site(health, clock, settings):
    """
    The broker's site on an inline store, with C{health} behind /health.
    """
    broker = Broker(inline_store(), clock, settings)
    return make_site(health, clock, settings, broker, BrokerServerFactory(broker, clock, settings))


class HTTPResponse:
    """
    The parts of a raw HTTP/1.1 response the tests look at.
    """

    def __init__(self, raw):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        self.code = int(status_line.split(b" ")[1])
        self.headers = Headers()
        for line in header_lines:
            name, _, value = line.partition(b":")
            self.headers.addRawHeader(name, value.strip())

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[0].decode("ascii")

    def json(self):
        return json.loads(self.body)


class SiteMixin:
    """
    A broker site on a fake store and a L{task.Clock}, spoken to over an
    in-memory transport through the real L{twisted.web.server.Site}.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.store = FakeStore()
        self.health = StoreHealth(self.store, self.clock)
        self.site = broker_site(self.health, self.clock, BrokerSettings())

    def request(self, method, path, headers=()):
        """
        Send one request; return the transport (the answer may come later).
        """
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        # Autobahn's WebSocketResource takes the connection over by
        # replacing the transport's protocol, as on a real TCP transport.
        transport.protocol = channel
        channel.makeConnection(transport)
        lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: localhost:7900"]
        lines += list(headers)
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
        self.addCleanup(transport.protocol.connectionLost, Failure(ConnectionDone()))
        return transport

    def get(self, path, method=b"GET", headers=()):
        """
        Send one request and parse its (already complete) answer.
        """
        return HTTPResponse(self.request(method, path, headers).value())


class HealthTests(SiteMixin, SynchronousTestCase):
    """
    C{GET /health}.
    """

    def test_fields(self):
        """/health answers 200 JSON with status, db, version, integer uptime and ms serverTime."""
        self.successResultOf(self.health.probe())
        self.clock.advance(42)
        response = self.get(b"/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"content-type"), "application/json")
        self.assertEqual(
            response.json(),
            {
                "status": "ok",
                "db": "up",
                "version": __version__,
                "uptime": 42,
                "serverTime": int((START + 42) * 1000),
            },
        )

    def test_dbDownStillLive(self):
        """A down store shows as db:"down" but liveness stays 200."""
        self.store.reachable = False
        with capturedLogs():
            self.successResultOf(self.health.probe())
        response = self.get(b"/health")
        self.assertEqual((response.code, response.json()["db"]), (200, "down"))

    def test_headWithoutBody(self):
        """HEAD /health answers like GET without a body."""
        response = self.get(b"/health", method=b"HEAD")
        self.assertEqual((response.code, response.body), (200, b""))


class ReadinessTests(SiteMixin, SynchronousTestCase):
    """
    C{GET /health/ready} follows the store down and back up.
    """

    def probe_tick(self):
        """
        One tick of the tap's probe timer, then time moves to the next.
        """
        self.successResultOf(self.health.probe())

    def test_downAndBackUp(self):
        """Ready, then 503 db_down while the store is down, then ready again, no restart."""
        self.probe_tick()
        response = self.get(b"/health/ready")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json(), {"status": "ready", "version": __version__,
                                           "uptime": 0})

        self.store.reachable = False
        self.clock.advance(5)
        with capturedLogs() as events:
            self.probe_tick()
        self.assertEqual(len(events), 1, "the transition is logged once")
        response = self.get(b"/health/ready")
        self.assertEqual(response.code, 503)
        self.assertEqual(response.header(b"content-type"), "application/json")
        self.assertEqual(response.json(), {"status": "not_ready", "reason": "db_down"})

        self.store.reachable = True
        self.clock.advance(5)
        with capturedLogs():
            self.probe_tick()
        response = self.get(b"/health/ready")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json()["uptime"], 10)

    def test_freshPingWhenStale(self):
        """Without a recent probe, readiness pings the store itself."""
        self.probe_tick()
        self.store.reachable = False
        self.clock.advance(2)
        with capturedLogs():
            response = self.get(b"/health/ready")
        self.assertEqual((response.code, self.store.pings), (503, 2))

    def test_recentAnswerReused(self):
        """Readiness requests within a second of a ping reuse its answer."""
        self.probe_tick()
        self.clock.advance(0.5)
        for _ in range(3):
            self.assertEqual(self.get(b"/health/ready").code, 200)
        self.assertEqual(self.store.pings, 1)

    def test_beforeFirstProbe(self):
        """A request before any probe pings the store and answers from that."""
        self.assertEqual(self.get(b"/health/ready").code, 200)
        self.assertEqual(self.store.pings, 1)

    def test_hangingPingTimesOut(self):
        """A ping that never answers counts as down after the ping timeout, and is shared."""
        self.store.hanging = True
        first = self.request(b"GET", b"/health/ready")
        second = self.request(b"GET", b"/health/ready")
        self.assertEqual((first.value(), second.value()), (b"", b""))
        with capturedLogs():
            self.clock.advance(PING_TIMEOUT_SECONDS)
        self.assertEqual(HTTPResponse(first.value()).code, 503)
        self.assertEqual(HTTPResponse(second.value()).code, 503)
        self.assertEqual(self.store.pings, 1)

    def test_clientGoneBeforeAnswer(self):
        """A client that hangs up during the ping gets no write (and nothing breaks)."""
        self.store.hanging = True
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.connectionLost(Failure(ConnectionDone()))
        with capturedLogs():
            self.clock.advance(PING_TIMEOUT_SECONDS)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(self.health.up)

    def test_notPingedBeforeOpen(self):
        """Until the store has opened it counts as down and is not pinged."""
        health = StoreHealth(self.store, self.clock, opened=False)
        self.assertFalse(self.successResultOf(health.probe()))
        self.assertFalse(self.successResultOf(health.check()))
        self.assertEqual(self.store.pings, 0)
        self.assertTrue(self.successResultOf(health.store_opened()))
        self.assertEqual((health.up, self.store.pings), (True, 1))

    def test_probeNeverFails(self):
        """StoreHealth.probe fires with a boolean whatever the store does."""
        self.store.reachable = False
        with capturedLogs():
            results = [self.health.probe(), self.health.probe()]
        self.assertEqual(self.successResultOf(gatherResults(results)), [False, False])
        self.store.reachable = True
        self.assertTrue(self.successResultOf(self.health.probe()))


class MetricsTests(SiteMixin, SynchronousTestCase):
    """
    C{GET /metrics}.
    """

    def test_exposition(self):
        """/metrics is Prometheus text 0.0.4 with the broker's own metrics."""
        self.successResultOf(self.health.probe())
        response = self.get(b"/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.header(b"content-type").startswith("text/plain; version=0.0.4"),
            response.header(b"content-type"),
        )
        self.assertIn(b"# HELP claudemesh_store_up ", response.body)
        self.assertIn(b"claudemesh_store_up 1.0", response.body)
        self.assertIn(f'claudemesh_build_info{{version="{__version__}"}} 1.0'.encode(),
                      response.body)

    def test_registryIsolated(self):
        """Two sites keep separate registries (the global default one is not used)."""
        other = broker_site(StoreHealth(FakeStore(), self.clock), self.clock, BrokerSettings())
        self.assertIsNot(other.resource.children[b"metrics"]._registry,
                         self.site.resource.children[b"metrics"]._registry)


class RoutingTests(SiteMixin, SynchronousTestCase):
    """
    Unknown paths and wrong methods.
    """

    def test_unknownPaths(self):
        """Unknown paths, the root and paths below known leaves answer 404 JSON."""
        for path in (b"/", b"/nope", b"/health/nope", b"/health/ready/x", b"/metrics/x",
                     b"/HEALTH"):
            response = self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.header(b"content-type"), "application/json")
            self.assertEqual(response.json(), {"error": "not_found"}, path)

    def test_wrongMethod(self):
        """A known path with an unsupported method answers 405 JSON with Allow."""
        for path in (b"/health", b"/health/ready", b"/metrics"):
            response = self.get(path, method=b"POST")
            self.assertEqual(response.code, 405, path)
            self.assertEqual(response.header(b"allow"), "GET, HEAD")
            self.assertEqual(response.json(), {"error": "method_not_allowed"})

    def test_wrongMethodOnPostRoutes(self):
        """
        The POST routes answer any other method, HEAD included, 405 JSON with
        C{Allow: POST}: not a 500 with a traceback in the log (HEAD), nor
        Twisted's HTML page (GET) or its 501 (PUT, DELETE, ...).
        """
        for path in (b"/meshes", b"/join", b"/hook/set-status"):
            for method in (b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"):
                with capturedLogs() as events:
                    response = self.get(path, method=method)
                self.assertEqual(response.code, 405, (path, method))
                self.assertEqual(response.header(b"allow"), "POST", (path, method))
                self.assertEqual(response.header(b"content-type"), "application/json")
                if method != b"HEAD":
                    self.assertEqual(response.json(), {"error": "method_not_allowed"})
                self.assertEqual([e for e in events if e.get("log_failure")
                                  or "eat it" in e.get("log_format", "")], [], (path, method))

    def test_headLogsNothing(self):
        """
        HEAD on a GET route (or an unknown path) answers without a body and
        without Twisted's "returning a message body" line in the log for
        every such request.
        """
        for path, code in ((b"/health", 200), (b"/metrics", 200), (b"/", 404), (b"/nope", 404)):
            with capturedLogs() as events:
                response = self.get(path, method=b"HEAD")
            self.assertEqual((response.code, response.body), (code, b""), path)
            self.assertGreater(int(response.header(b"content-length")), 0, path)
            self.assertEqual([e for e in events if "eat it" in e.get("log_format", "")], [],
                             path)

    def test_webSocketWithoutUpgrade(self):
        """A plain GET /ws is answered 426 Upgrade Required, not served as a page."""
        response = self.get(b"/ws")
        self.assertEqual(response.code, 426)
        self.assertNotIn(b"Autobahn", response.body)

    def test_noAccessLog(self):
        """Requests are not logged by the site (URLs may carry secrets)."""
        with capturedLogs() as events:
            self.get(b"/health?token=secret-token")
        self.assertNotIn("secret-token", repr(events))

    def test_webSocketOptions(self):
        """The /ws factory carries the liveness and size options (outbound limit + 1024)."""
        settings = BrokerSettings(max_message_bytes=4096)
        factory = BrokerServerFactory(Broker(inline_store(), self.clock, settings), self.clock,
                                      settings)
        self.assertEqual(
            (factory.autoPingInterval, factory.autoPingTimeout, factory.failByDrop,
             factory.maxMessagePayloadSize, factory.maxFramePayloadSize, factory.webStatus,
             factory.reactor),
            (30, 75, False, 4096 + 1024, 4096, False, self.clock),
        )


class _ClientProtocol(WebSocketClientProtocol):
    """
    Send the test's payload once open, record the answer, close.
    """

    def onOpen(self):
        self.sendMessage(self.factory.payload)

    def onMessage(self, payload, isBinary):
        self.factory.received.append(payload)
        self.sendClose(1000)

    def onClose(self, wasClean, code, reason):
        self.factory.closed.callback((wasClean, code))


class WebSocketIntegrationTests(TestCase):
    """
    /ws over a real socket on 127.0.0.1 with a real Autobahn client.
    """

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        settings = BrokerSettings(max_message_bytes=1024)
        broker = Broker(inline_store(), reactor, settings)
        self.ws_factory = BrokerServerFactory(broker, reactor, settings)
        self.ws_factory.protocol = TrackedServerProtocol
        self.ws_factory.live = set()
        self.ws_factory.waiting = []
        self.ws_factory.doStart()
        self.addCleanup(self.ws_factory.doStop)
        site = make_site(StoreHealth(FakeStore(), reactor), reactor, settings, broker,
                         self.ws_factory)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def connect(self, payload):
        """
        Connect a client that sends C{payload}; return its factory.
        """
        port = self.port.getHost().port
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws", reactor=self.reactor)
        factory.protocol = _ClientProtocol
        factory.payload = payload
        factory.received = []
        factory.closed = Deferred()
        self.reactor.connectTCP("127.0.0.1", port, factory)
        return factory

    def server_gone(self):
        """
        A Deferred firing once the server side of the one connection is
        gone (so no Autobahn timer outlives the test).
        """
        if not self.ws_factory.live:
            return succeed(None)
        d = Deferred()
        self.ws_factory.waiting.append(d)
        return d

    async def test_frameAnsweredWithError(self):
        """A bad frame over a real socket gets its error frame; the client then closes cleanly."""
        client = self.connect(b'{"type":"hello"}')
        was_clean, code = await client.closed
        await self.server_gone()
        self.assertEqual([json.loads(frame) for frame in client.received], [{
            "type": "error",
            "code": "malformed",
            "message": "field 'meshId' is required",
        }])
        self.assertEqual((was_clean, code), (True, 1000))

    async def test_oversizedFrameCloses1009(self):
        """A frame over max-message-bytes closes with 1009, not a dropped connection."""
        client = self.connect(b"x" * 2048)
        was_clean, code = await client.closed
        await self.server_gone()
        self.assertEqual((client.received, code), ([], 1009))
