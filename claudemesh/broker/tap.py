"""
C{twistd claudemesh-broker}: the broker's command line and its service tree.

The options live in L{claudemesh.broker.options} (L{Options} turns flags and
environment variables into a configuration dictionary whose C{"settings"} is
a L{BrokerSettings}); L{makeService} builds the L{MultiService} that twistd
runs::

    store            opens the store at start, closes it at stop
    ws-factory       starts/stops the WebSocket factory behind /ws
    web              the HTTP/WebSocket port (StreamServerEndpointService)
    store-probe      pings the store every few seconds for /health/ready
"""

import signal
import socket

import autobahn
import autobahn.websocket
from prometheus_client import CollectorRegistry
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from claudemesh import __version__
from claudemesh.broker.cluster import LocalBackplane
from claudemesh.broker.core import Broker
from claudemesh.broker.metrics import BrokerMetrics
from claudemesh.broker.options import (  # noqa: F401 (twistd's ServiceMaker reads tap.Options)
    Options,
    is_loopback_endpoint,
    resolve_admin_token,
)
from claudemesh.broker.retention import RETENTION_INTERVAL_SECONDS, RetentionSweep
from claudemesh.broker.web import (
    StoreHealth,
    make_site,
    register_health_metrics,
)
from claudemesh.broker.workers import ReusePortEndpoint, make_supervisor
from claudemesh.broker.ws import BrokerServerFactory
from claudemesh.store import DatabaseInUse, StoreService, describe_store, make_store
from claudemesh.store.listener import PostgresBackplane

_log = Logger()

# How often the store is pinged for /health and /health/ready. Together with
# the 4 s ping timeout of StoreHealth this bounds how long readiness lags an
# outage (and a recovery) to well under ten seconds.
STORE_PROBE_SECONDS = 5.0

def timer_step(description, function, *args, **kwargs):
    """
    Wrap C{function} for a L{TimerService} so that its failure is logged and
    never stops the loop.

    A L{LoopingCall} stops for good at the first exception or failed
    L{Deferred} of its function; in the magic-wormhole mailbox server that
    silently ended pruning for twelve hours (magic-wormhole-mailbox-server
    issue 13). Each step logs its own failure instead and the timer runs it
    again at the next tick.

    @param description: what the step does, for the log.
    @param function: the callable, with C{args} and C{kwargs}; it may
        return a L{Deferred}, which the timer waits for.
    @return: a zero-argument callable.
    """

    def step():
        try:
            result = function(*args, **kwargs)
        except Exception:
            _log.failure("timer step {step} failed; it runs again at the next tick",
                         step=description)
            return None
        if isinstance(result, Deferred):
            result.addErrback(
                lambda failure: _log.failure(
                    "timer step {step} failed; it runs again at the next tick",
                    failure,
                    step=description,
                )
            )
        return result

    return step


class OrderedMultiService(MultiService):
    """
    A L{MultiService} that stops its children one after another, in reverse
    order, each after the previous one finished stopping.

    L{MultiService} stops every child at once; the broker must flush its
    pending writes before the store closes, and stop listening before it
    closes its sessions.
    """

    def stopService(self):
        Service.stopService(self)
        d = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, child=child: child.stopService())
            d.addErrback(lambda f, child=child: _log.failure(
                "stopping {service} failed", f, service=child.name))
        return d


class WebSocketFactoryService(Service):
    """
    Start and stop the WebSocket factory mounted in the resource tree.

    A L{twisted.web.server.Site} starts its own factory when it listens, but
    not the Autobahn factory wrapped in a L{WebSocketResource} (the FIXME in
    Autobahn's twistd example), so C{startFactory}/C{stopFactory} of the
    WebSocket factory would otherwise never run.
    """

    def __init__(self, factory):
        self.factory = factory

    def startService(self):
        super().startService()
        self.factory.doStart()

    def stopService(self):
        self.factory.doStop()
        return super().stopService()


def _log_startup(config, store_description):
    nvx = bool(getattr(autobahn.websocket, "USES_NVX", False))
    _log.info(
        "claudemesh broker {version} starting: store {store}, listening on {port}, "
        # NVX still validates UTF-8; unmasking is claudemesh.broker.framemask's
        # whatever NVX says (docs/performance.md).
        "autobahn {autobahn_version} (NVX UTF-8 validation: {nvx}, frames unmasked by "
        "claudemesh.broker.framemask)",
        version=__version__,
        store_kind="sqlite" if config["database-url"] is None else "postgres",
        store=store_description,
        port=config["port"],
        autobahn_version=autobahn.__version__,
        nvx=nvx,
    )


def makeService(config, reactor=None):
    """
    Build the broker's service tree from parsed L{Options}.

    @param config: a parsed L{Options}.
    @param reactor: the reactor to listen on and take time from; the global
        one when C{None} (only twistd passes nothing).
    @return: a L{MultiService}.
    """
    if reactor is None:
        from twisted.internet import reactor
    settings = config["settings"]
    top = OrderedMultiService()
    hostname = socket.gethostname()
    node_name = config["node-name"] or "%s:%s" % (hostname, config["port"])
    if config["workers"] > 1:
        # This process supervises; the workers serve (claudemesh.broker.workers).
        workers = dict(config)
        workers["node-name"] = node_name
        make_supervisor(workers, resolve_admin_token(config, config["data-dir"]),
                        reactor).setServiceParent(top)
        _log.info("claudemesh broker {version}: supervising {count} workers {name}/w1.. "
                  "sharing {port}", version=__version__, count=config["workers"],
                  name=node_name, port=config["port"])
        _exit_zero_after_sigterm_of(reactor)
        return top

    # make_store creates the data directory (0700) for the SQLite default.
    store = make_store(
        config["database-url"], config["data-dir"], config["database-schema"], reactor
    )
    if config["database-url"] is None:
        # One process per SQLite file (issue 15): a second broker on the
        # same data directory stops here, naming Postgres.
        try:
            store.claim_process()
        except DatabaseInUse as e:
            raise SystemExit("claudemesh-broker: %s" % (e,)) from None
        backplane = LocalBackplane()
    else:
        backplane = PostgresBackplane(config["database-url"], config["database-schema"],
                                      reactor)
    store_service = StoreService(store, reactor)
    store_service.setName("store")
    store_service.setServiceParent(top)

    health = StoreHealth(store, reactor, opened=False)
    # Until the store opens (the StoreService retries, logging why it
    # cannot) readiness stays 503, which is the truth.
    store_service.whenOpen().addCallbacks(lambda _: health.store_opened(), lambda _: None)
    # The broker's own registry, not prometheus_client's global one: tests
    # (and several brokers in one process) stay isolated.
    registry = CollectorRegistry()
    register_health_metrics(registry, health)

    metrics = BrokerMetrics(registry)
    store.on_transaction = metrics.observe_transaction
    broker = Broker(store, reactor, settings, metrics=metrics, backplane=backplane,
                    node_name=node_name, hostname=hostname)
    broker.setName("broker")
    # After the store service, so it stops first: its stopService flushes
    # the pending store writes while the store is still open.
    broker.setServiceParent(top)
    store_service.whenOpen().addCallbacks(lambda _: broker.store_opened(), lambda _: None)
    ws_factory = BrokerServerFactory(broker, reactor, settings)

    ws_factory_service = WebSocketFactoryService(ws_factory)
    ws_factory_service.setName("ws-factory")
    ws_factory_service.setServiceParent(top)

    site = make_site(health, reactor, settings, registry=registry, ws_factory=ws_factory,
                     broker=broker,
                     admin_token=resolve_admin_token(config, config["data-dir"]))
    if config["reuse-port"]:
        # One of several processes sharing the port (--workers).
        endpoint = ReusePortEndpoint(reactor, config["port"])
    else:
        endpoint = serverFromString(reactor, config["port"])
    web_service = StreamServerEndpointService(endpoint, site)
    # A port that cannot be bound (in use, privileged) must stop twistd at
    # start instead of leaving a broker that runs without listening.
    web_service._raiseSynchronously = True
    web_service.setName("web")
    web_service.setServiceParent(top)

    probe = TimerService(STORE_PROBE_SECONDS, timer_step("store health probe", health.probe))
    probe.clock = reactor
    probe.setName("store-probe")
    probe.setServiceParent(top)

    retention = RetentionSweep(store, reactor, settings.retention_days, broker.metrics)

    def sweep_retention():
        # Nothing to sweep before the store is open (the first tick comes at
        # start-up, while it may still be opening).
        if health.opened:
            return retention.run()
        return None

    sweeper = TimerService(RETENTION_INTERVAL_SECONDS, timer_step("retention", sweep_retention))
    sweeper.clock = reactor
    sweeper.setName("retention")
    sweeper.setServiceParent(top)

    # twistd re-raises the signal that stopped it, so even a complete
    # graceful shutdown would end as "killed by SIGTERM"; by the "after"
    # phase the sessions are closed and the writes flushed: exit 0.
    _exit_zero_after_sigterm_of(reactor)

    _log_startup(config, describe_store(config["database-url"], config["data-dir"]))
    return top


def _exit_zero_after_sigterm_of(reactor):
    add_trigger = getattr(reactor, "addSystemEventTrigger", None)
    if add_trigger is not None:
        add_trigger("after", "shutdown", _exit_zero_after_sigterm, reactor)


def _exit_zero_after_sigterm(reactor):
    if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
        reactor._exitSignal = None
