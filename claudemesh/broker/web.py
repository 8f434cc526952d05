"""
The HTTP side of the broker: one Resource tree on the one listening port.

Routes (docs/configuration.md)::

    /ws             the WebSocket endpoint (Autobahn WebSocketResource)
    /health         GET liveness: always 200 while the process serves HTTP
    /health/ready   GET readiness: 503 while the store is unreachable
    /metrics        GET Prometheus text exposition of the broker's registry
    /hook/set-status  POST, the Claude Code hook (claudemesh.broker.hookroute)
    /meshes           POST, create a mesh (claudemesh.broker.meshroutes)
    /join             POST, join with an invite (claudemesh.broker.meshroutes)

Every other path answers 404 C{{"error": "not_found"}} and a known path asked
with a method it does not implement answers 405 with an C{Allow} header; all
answers except C{/metrics} are JSON.
"""


from prometheus_client import CollectorRegistry, Gauge, Info
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import NOT_DONE_YET, Site

from claudemesh import __version__
from claudemesh.broker.admission import Admission, BrokerRequest
from claudemesh.broker.hookroute import HookStatusResource
from claudemesh.broker.jsonresource import (
    JSONResource,
    NotFoundResource,
    json_body,
    without_body_for_head,
)
from claudemesh.broker.meshroutes import JoinResource, MeshCreationResource
from claudemesh.broker.ws import AdmittingWebSocketResource

# How long a readiness answer may reuse the last ping. Load balancers poll
# /health/ready every few seconds; coalescing keeps a burst of (unauthenticated)
# readiness requests from turning into a burst of database round trips.
READINESS_MAX_AGE_SECONDS = 1.0

# A ping that has not answered by then counts as a failure: a database behind
# a dead network path does not refuse, it just never answers.
PING_TIMEOUT_SECONDS = 4.0


class StoreHealth:
    """
    What the broker currently knows about its store's reachability.

    The tap's probe timer calls L{probe} every few seconds; C{/health} reads
    L{up}; C{/health/ready} calls L{check}, which pings again when the last
    answer is older than a second. A ping in flight is shared by every caller
    that asks while it runs, so there is never more than one at a time.

    Until L{store_opened} is called the store counts as down and is not
    pinged: a ping racing the store's own connection set-up would only
    disturb it.

    @ivar up: C{True} when the last ping succeeded; C{False} before the first
        ping has answered and after a failed one.
    @ivar checked_at: the clock time the last ping answered (or failed), or
        C{None} before the first one.
    """

    _log = Logger()

    def __init__(self, store, clock, ping_timeout=PING_TIMEOUT_SECONDS, opened=True):
        """
        @param store: an L{claudemesh.store.interface.IStore} provider.
        @param clock: an L{twisted.internet.interfaces.IReactorTime}.
        @param ping_timeout: seconds after which an unanswered ping fails.
        @param opened: whether the store is open already; when C{False},
            L{store_opened} says when it is.
        """
        self._store = store
        self._clock = clock
        self._ping_timeout = ping_timeout
        self._opened = opened
        self._waiting = []
        self.up = False
        self.checked_at = None

    @property
    def opened(self):
        """
        Whether the store finished opening.
        """
        return self._opened

    def store_opened(self):
        """
        The store finished opening: ping it now (rather than at the next
        probe tick, up to five seconds later) and from then on.

        @return: the L{Deferred} of that first L{probe}.
        """
        self._opened = True
        return self.probe()

    def probe(self):
        """
        Ping the store now (or join the ping already running).

        @return: a L{Deferred} firing with C{True} when the store answered and
            C{False} otherwise. It never fails.
        """
        answer = Deferred()
        if not self._opened:
            answer.callback(False)
            return answer
        self._waiting.append(answer)
        if len(self._waiting) == 1:
            pinging = maybeDeferred(self._store.ping)
            pinging.addTimeout(self._ping_timeout, self._clock)
            pinging.addCallbacks(self._answered, self._failed)
        return answer

    def check(self, max_age=READINESS_MAX_AGE_SECONDS):
        """
        The store's reachability, pinging again unless the last answer is
        younger than C{max_age} seconds.

        @return: a L{Deferred} firing with C{True} or C{False}.
        """
        fresh = (
            self.checked_at is not None
            and self._clock.seconds() - self.checked_at < max_age
            and not self._waiting
        )
        if fresh:
            answer = Deferred()
            answer.callback(self.up)
            return answer
        return self.probe()

    def _answered(self, ignored):
        if not self.up and self.checked_at is not None:
            self._log.info("store is reachable again")
        self._record(True)

    def _failed(self, failure):
        if self.up or self.checked_at is None:
            # Log the transition, not every failed probe: an outage would
            # otherwise write a line every five seconds.
            self._log.warn(
                "store is unreachable: {reason}", reason=failure.getErrorMessage()
            )
        self._record(False)

    def _record(self, up):
        self.up = up
        self.checked_at = self._clock.seconds()
        waiting, self._waiting = self._waiting, []
        for answer in waiting:
            answer.callback(up)


def register_health_metrics(registry, health):
    """
    Register the broker's own process-level metrics in C{registry}:
    C{claudemesh_build_info}, C{claudemesh_store_up} and the standard
    C{process_*} collector.

    @param registry: the broker's L{CollectorRegistry} (never the global
        default one, so that tests and several brokers in one process stay
        isolated).
    @param health: the L{StoreHealth} whose state C{claudemesh_store_up}
        exports.
    """
    Info(
        "claudemesh_build", "The claudemesh broker's version.", registry=registry
    ).info({"version": __version__})
    store_up = Gauge(
        "claudemesh_store_up",
        "1 when the last store ping succeeded, else 0.",
        registry=registry,
    )
    store_up.set_function(lambda: 1.0 if health.up else 0.0)
    ProcessCollector(registry=registry)


class BrokerRoot(JSONResource):
    """
    The root of the broker's tree. C{/} itself is not a route.
    """

    def render(self, request):
        return without_body_for_head(request, json_body(request, 404, {"error": "not_found"}))


class _StoreHealthResource(JSONResource):
    """
    A resource that answers from the broker's L{StoreHealth}.
    """

    def __init__(self, health, clock, started_at):
        """
        @param health: the broker's L{StoreHealth}.
        @param clock: an L{twisted.internet.interfaces.IReactorTime}.
        @param started_at: the clock time the broker started, for C{uptime}.
        """
        super().__init__()
        self._health = health
        self._clock = clock
        self._started_at = started_at


class HealthResource(_StoreHealthResource):
    """
    C{GET /health}: liveness. Always 200 while the process answers HTTP; the
    store's state is reported (C{db}) but does not change the status code, so
    a supervisor does not restart a broker that is merely waiting for its
    database.
    """

    def render_GET(self, request):
        now = self._clock.seconds()
        return json_body(
            request,
            200,
            {
                "status": "ok",
                "db": "up" if self._health.up else "down",
                "version": __version__,
                "uptime": int(now - self._started_at),
                "serverTime": int(now * 1000),
            },
        )


class ReadinessResource(_StoreHealthResource):
    """
    C{GET /health/ready}: 200 C{{"status": "ready"}} when the store answers a
    ping, 503 C{{"status": "not_ready", "reason": "db_down"}} while it does
    not. It follows the store down and back up without a restart.
    """

    _log = Logger()

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(lambda failure: gone.append(failure))

        def answer(up):
            if gone:
                # The client hung up while we pinged; there is no one to
                # answer.
                return
            if up:
                body = json_body(
                    request,
                    200,
                    {
                        "status": "ready",
                        "version": __version__,
                        "uptime": int(self._clock.seconds() - self._started_at),
                    },
                )
            else:
                body = json_body(
                    request, 503, {"status": "not_ready", "reason": "db_down"}
                )
            # Answered after render returned: without a length, HTTP/1.1
            # would chunk the body.
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            request.write(body)
            request.finish()

        def broken(failure):
            # StoreHealth.check never fails; if it ever does, answer rather
            # than leave the load balancer hanging.
            self._log.failure("readiness check failed", failure)
            answer(False)

        self._health.check().addCallback(answer).addErrback(broken)
        return NOT_DONE_YET


class MetricsResource(JSONResource):
    """
    C{GET /metrics}: the broker's Prometheus registry in the text exposition
    format 0.0.4 (understood by every Prometheus version).
    """

    def __init__(self, registry):
        """
        @param registry: the broker's L{CollectorRegistry}.
        """
        super().__init__()
        self._registry = registry

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_PLAIN_0_0_4.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self._registry)


# The first bytes of a TLS handshake record (ContentType 22, version 3.x).
TLS_HANDSHAKE_START = b"\x16\x03"
NOT_TLS_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n"
    b"This claudemesh broker speaks plain HTTP and WebSocket on this port: use ws://, "
    b"not wss://, or put TLS in front of it (docs/operations.md).\n")


class BrokerChannel(HTTPChannel):
    """
    An L{HTTPChannel} that answers a TLS handshake at once: a client given
    C{wss://} for a plain broker would otherwise wait for its timeout (the
    HTTP parser waits for a line that never comes), then report a bare
    timeout. The plain-text answer makes its TLS layer fail right away.
    """

    _first = True

    def dataReceived(self, data):
        if self._first:
            self._first = False
            if data.startswith(TLS_HANDSHAKE_START):
                self.transport.write(NOT_TLS_ANSWER)
                self.transport.loseConnection()
                return
        HTTPChannel.dataReceived(self, data)


class BrokerSite(Site):
    """
    The broker's L{Site}: no per-request access log and no tracebacks in
    error pages, and L{BrokerChannel}s (HTTP/1.1: the broker does not speak
    HTTP/2).

    Access logs are off because request lines are where secrets leak: a
    WebSocket URL with a token in its query, an invite token in a path. The
    broker logs what it does itself, with structured fields chosen not to
    carry secrets (docs/configuration.md).
    """

    displayTracebacks = False
    requestFactory = BrokerRequest
    # Set by make_site: the admission of its connections (deadlines and
    # per-address counts from accept), and the largest request body.
    admission = None
    max_body_bytes = 0
    protocol = BrokerChannel

    def log(self, request):
        """
        Do not log the request (see the class docstring).
        """

    def buildProtocol(self, addr):
        channel = Site.buildProtocol(self, addr)
        if self.admission is None:
            return channel
        return self.admission.wrap(channel, addr)


def make_site(health, clock, settings, broker, ws_factory, registry=None, admin_token=None):
    """
    Build the broker's L{BrokerSite} with its whole resource tree.

    @param health: the broker's L{StoreHealth}.
    @param clock: an L{twisted.internet.interfaces.IReactorTime}.
    @param settings: the L{claudemesh.broker.settings.BrokerSettings}.
    @param broker: the L{claudemesh.broker.core.Broker} behind the routes
        (C{/hook/set-status}, C{/meshes}, C{/join}).
    @param ws_factory: the L{BrokerServerFactory} for C{/ws}. Twisted's
        L{Site} does not start or stop factories wrapped in a
        L{WebSocketResource}: the caller does (see
        L{claudemesh.broker.tap.WebSocketFactoryService}).
    @param registry: the L{CollectorRegistry} served at C{/metrics}; a new
        one carrying L{register_health_metrics} when C{None}.
    @param admin_token: the token C{POST /meshes} requires, or C{None} when
        creation is open to local clients
        (L{claudemesh.broker.tap.resolve_admin_token} decides).
    @return: a L{BrokerSite}, with the WebSocket factory as its C{ws_factory}
        attribute.
    """
    if registry is None:
        registry = CollectorRegistry()
        register_health_metrics(registry, health)
    started_at = clock.seconds()
    root = BrokerRoot()
    health_resource = HealthResource(health, clock, started_at)
    health_resource.putChild(b"ready", ReadinessResource(health, clock, started_at))
    root.putChild(b"health", health_resource)
    root.putChild(b"metrics", MetricsResource(registry))
    # Per-address limits are checked before the upgrade.
    root.putChild(b"ws", AdmittingWebSocketResource(ws_factory))
    hook = NotFoundResource()
    hook.putChild(b"set-status", HookStatusResource(
        broker.hooks, broker.metrics, settings.max_message_bytes))
    root.putChild(b"hook", hook)
    root.putChild(b"meshes", MeshCreationResource(
        broker.membership, admin_token, settings.max_message_bytes))
    root.putChild(b"join", JoinResource(broker.membership, settings.max_message_bytes))
    site = BrokerSite(root, reactor=clock)
    site.noisy = False
    site.ws_factory = ws_factory
    site.max_body_bytes = settings.max_message_bytes
    site.admission = Admission(clock, settings.header_timeout_seconds, ws_factory.limits,
                               broker.presence.count_rejected)
    return site
