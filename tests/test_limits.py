# -*- test-case-name: tests.test_limits -*-
"""
Per-address limits (L{claudemesh.broker.limits}): the rules on a fake clock,
the HTTP 429 before the upgrade over memory wires (L{twisted.test.iosim}),
and once over real sockets through the broker's Site.
"""

import base64
import os

import txaio
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.test import iosim
from twisted.trial import unittest

from claudemesh.broker.limits import AddressLimits, peer_host
from claudemesh.broker.ws import BrokerServerFactory
from soak.harness import close_raw, raw_upgrade
from tests.clientfixture import InProcessBroker
from tests.meshfixture import BrokerFixture, WireConnection


class PeerHostTests(unittest.SynchronousTestCase):
    def test_tcp4(self):
        """An IPv4 peer string gives its address without the port."""
        self.assertEqual(peer_host("tcp4:203.0.113.9:51234"), "203.0.113.9")
        self.assertEqual(peer_host("tcp:203.0.113.9:51234"), "203.0.113.9")

    def test_tcp6(self):
        """An IPv6 peer string keeps every colon of the address."""
        self.assertEqual(peer_host("tcp6:::1:51234"), "::1")
        self.assertEqual(peer_host("tcp6:2001:db8::7:443"), "2001:db8::7")

    def test_other(self):
        """Anything else (a Unix socket, garbage) is its own key."""
        self.assertEqual(peer_host("unix"), "unix")
        self.assertEqual(peer_host("tcp:nonsense"), "tcp:nonsense")
        self.assertEqual(peer_host(""), "")


class ClientAddressTests(unittest.SynchronousTestCase):
    def limits(self, proxies=()):
        return AddressLimits(task.Clock(), 10, 10, proxies)

    def test_no_proxy_ignores_header(self):
        """Without trusted proxies X-Forwarded-For is ignored."""
        self.assertEqual(self.limits().client_address("tcp4:198.51.100.7:1", "203.0.113.1"),
                         "198.51.100.7")

    def test_untrusted_peer_ignored(self):
        """A peer that is not a trusted proxy cannot choose its address with the header."""
        limits = self.limits(["10.0.0.0/8"])
        self.assertEqual(limits.client_address("tcp4:198.51.100.7:1", "203.0.113.1"),
                         "198.51.100.7")

    def test_trusted_proxy_last_hop(self):
        """From a trusted proxy, the last address of X-Forwarded-For counts (the one it saw)."""
        limits = self.limits(["127.0.0.1", "10.0.0.0/8"])
        self.assertEqual(limits.client_address("tcp4:127.0.0.1:1", "203.0.113.1"),
                         "203.0.113.1")
        self.assertEqual(limits.client_address("tcp4:10.1.2.3:1", "6.6.6.6, 203.0.113.2 "),
                         "203.0.113.2")

    def test_trusted_ipv6(self):
        """An IPv6 trusted proxy is matched too."""
        limits = self.limits(["::1"])
        self.assertEqual(limits.client_address("tcp6:::1:1", "2001:db8::9"), "2001:db8::9")

    def test_trusted_empty_header(self):
        """A trusted proxy without (or with an empty) header counts as itself."""
        limits = self.limits(["127.0.0.1"])
        for header in (None, "", " , "):
            self.assertEqual(limits.client_address("tcp4:127.0.0.1:1", header), "127.0.0.1")

    def test_non_ip_peer_not_trusted(self):
        """A peer whose host is no IP address is never a trusted proxy."""
        limits = self.limits(["127.0.0.1"])
        self.assertEqual(limits.client_address("unix", "203.0.113.1"), "unix")


class AdmitTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)

    def test_connection_cap(self):
        """With max 2, the third open connection of an address is refused; others are not."""
        limits = AddressLimits(self.clock, 2, 0)
        self.assertEqual([limits.admit("a") for _ in range(3)],
                         [None, None, "too_many_connections"])
        self.assertIsNone(limits.admit("b"))
        self.assertEqual(limits.open_connections("a"), 2)

    def test_release(self):
        """A released connection makes room again; releasing an unknown one is harmless."""
        limits = AddressLimits(self.clock, 1, 0)
        self.assertIsNone(limits.admit("a"))
        self.assertEqual(limits.admit("a"), "too_many_connections")
        limits.release("a")
        self.assertEqual(limits.open_connections("a"), 0)
        limits.release("a")
        limits.release("never")
        self.assertEqual(limits.open_connections("a"), 0)
        self.assertIsNone(limits.admit("a"))

    def test_rate(self):
        """20 upgrades a second pass, the 21st is rate_limited; a second later there is room."""
        limits = AddressLimits(self.clock, 0, 20)
        self.assertEqual([limits.admit("a") for _ in range(20)], [None] * 20)
        self.assertEqual(limits.admit("a"), "rate_limited")
        self.assertIsNone(limits.admit("b"))
        self.clock.advance(1)
        self.assertEqual([limits.admit("a") for _ in range(20)], [None] * 20)
        self.assertEqual(limits.admit("a"), "rate_limited")

    def test_rate_refused_not_counted(self):
        """A refused upgrade does not count as an open connection."""
        limits = AddressLimits(self.clock, 5, 1)
        self.assertIsNone(limits.admit("a"))
        self.assertEqual(limits.admit("a"), "rate_limited")
        self.assertEqual(limits.open_connections("a"), 1)

    def test_off(self):
        """Limits of 0 admit everything."""
        limits = AddressLimits(self.clock, 0, 0)
        self.assertEqual({limits.admit("a") for _ in range(1000)}, {None})

    def test_sweep(self):
        """Buckets idle for long are forgotten, so memory follows the active addresses."""
        limits = AddressLimits(self.clock, 0, 5)
        for n in range(100):
            limits.admit("10.0.0.%d" % (n,))
        self.clock.advance(3600)
        limits.sweep()
        self.assertEqual(len(limits._rate), 0)


class RawClient(Protocol):
    """
    A bare upgrade request over a memory wire; keeps what it receives.
    """

    def __init__(self, headers=None):
        self.headers = headers or {}
        self.data = b""
        self.lost = False

    def connectionMade(self):
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = ["GET /ws HTTP/1.1", "Host: 127.0.0.1:7777", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
                 "Sec-WebSocket-Version: 13"]
        lines += ["%s: %s" % item for item in self.headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True

    @property
    def status(self):
        line = self.data.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) > 1 else None


class WireLimitTests(unittest.TestCase):
    settings = {"hello_rate_per_ip": 20, "max_connections_per_ip": 200}

    def setUp(self):
        self.fx = BrokerFixture(**self.settings)
        self.patch(txaio.tx.config, "loop", self.fx.clock)
        self.factory = BrokerServerFactory(self.fx.broker, self.fx.clock, self.fx.settings)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self._port = 50000

    def upgrade(self, host="203.0.113.9", headers=None):
        self._port += 1
        server_address = IPv4Address("TCP", "127.0.0.1", 7777)
        client_address = IPv4Address("TCP", host, self._port)
        server = self.factory.buildProtocol(client_address)
        client = RawClient(headers)
        pump = iosim.connect(
            server, iosim.FakeTransport(server, True, server_address, client_address),
            client, iosim.FakeTransport(client, False, client_address, server_address),
            clock=self.fx.clock)
        pump.flush()
        self.fx.flush()
        pump.flush()
        return client, server, pump

    def hello_from_localhost(self):
        wire = WireConnection(self.fx, self.factory)
        wire.send(self.alice.hello_dict(session_id="other-%d" % (self._port,)))
        return wire.last()["type"]

    def rejected(self, reason):
        metric = self.fx.metrics.connections_rejected.labels(reason)
        return metric._value.get()


class HelloRateOverTheWireTests(WireLimitTests):
    def test_21st_upgrade_429(self):
        """The 21st upgrade within a second from one address gets HTTP 429; others are served."""
        clients = [self.upgrade()[0] for _ in range(20)]
        self.assertEqual({c.status for c in clients}, {101})
        refused, server, pump = self.upgrade()
        self.assertEqual(refused.status, 429)
        self.assertTrue(refused.lost or server.transport.disconnecting)
        self.assertNotIn(b"Traceback", refused.data)
        self.assertEqual(self.rejected("rate_limited"), 1)
        self.assertEqual(self.hello_from_localhost(), "hello_ack")
        self.fx.clock.advance(1)
        self.assertEqual(self.upgrade()[0].status, 101)

    def test_untrusted_forwarded_for_ignored(self):
        """Without a trusted proxy, varying X-Forwarded-For does not escape the limit."""
        statuses = [self.upgrade(headers={"X-Forwarded-For": "198.51.100.%d" % (n,)})[0].status
                    for n in range(21)]
        self.assertEqual(statuses, [101] * 20 + [429])


class ConnectionCapOverTheWireTests(WireLimitTests):
    settings = {"hello_rate_per_ip": 0, "max_connections_per_ip": 2}

    def test_third_upgrade_429(self):
        """With max-connections-per-ip 2, the third open upgrade from one address gets 429."""
        first, _, _ = self.upgrade()
        second, server, pump = self.upgrade()
        third, _, _ = self.upgrade()
        self.assertEqual([first.status, second.status, third.status], [101, 101, 429])
        self.assertEqual(self.rejected("too_many_connections"), 1)
        self.assertEqual(self.upgrade(host="203.0.113.10")[0].status, 101)

    def test_closed_connection_released(self):
        """When one of them closes, the address may connect again."""
        self.upgrade()
        _, server, pump = self.upgrade()
        server.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.factory.limits.open_connections("203.0.113.9"), 1)
        self.assertEqual(self.upgrade()[0].status, 101)

    def test_authenticated_session_counts(self):
        """A connection that said hello counts until it closes."""
        wire = WireConnection(self.fx, self.factory)
        wire.send(self.alice.hello_dict())
        self.assertEqual(self.factory.limits.open_connections("127.0.0.1"), 1)
        wire.close()
        self.assertEqual(self.factory.limits.open_connections("127.0.0.1"), 0)


class TrustedProxyOverTheWireTests(WireLimitTests):
    settings = {"hello_rate_per_ip": 0, "max_connections_per_ip": 2,
                "trusted_proxies": ("10.0.0.1",)}

    def test_forwarded_addresses_counted_apart(self):
        """Behind a trusted proxy each forwarded address has its own cap."""
        def via_proxy(address):
            return self.upgrade(host="10.0.0.1", headers={"X-Forwarded-For": address})[0].status

        self.assertEqual([via_proxy("203.0.113.1") for _ in range(3)], [101, 101, 429])
        self.assertEqual(via_proxy("203.0.113.2"), 101)
        self.assertEqual(self.factory.limits.open_connections("203.0.113.1"), 2)
        self.assertEqual(self.factory.limits.open_connections("10.0.0.1"), 0)


class RealSocketLimitTests(unittest.TestCase):
    """
    The 429 through the broker's real Site (the upgrade goes through
    Autobahn's WebSocketResource), on a port of 127.0.0.1.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_third_upgrade_429(self):
        """Over real sockets the third concurrent upgrade from 127.0.0.1 is answered 429."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        broker = InProcessBroker(reactor, directory, max_connections_per_ip=2,
                                 hello_rate_per_ip=0)
        yield broker.start()
        self.addCleanup(broker.stop)
        port = broker.port.getHost().port
        held = []
        self.addCleanup(close_raw, held)
        statuses = []
        for _ in range(3):
            status, proto = yield raw_upgrade(reactor, port)
            statuses.append(status)
            held.append(proto)
        self.assertEqual(statuses, [101, 101, 429])
        yield held[2].lost
        yield close_raw(held[:1])
        yield _until(lambda: broker.factory.limits.open_connections("127.0.0.1") == 1)
        status, proto = yield raw_upgrade(reactor, port)
        held.append(proto)
        self.assertEqual(status, 101)


@defer.inlineCallbacks
def _until(condition, timeout=10.0):
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met within %s s" % (timeout,))
        yield task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class FloodPenaltyTests(unittest.TestCase):
    def test_penalty_refuses_then_lapses(self):
        """An address penalised for flooding is refused for the penalty, then admitted again."""
        clock = task.Clock()
        limits = AddressLimits(clock, 10, 10)
        limits.penalise("203.0.113.7", 10)
        self.assertEqual(limits.admit("203.0.113.7"), "flood")
        self.assertIsNone(limits.admit("203.0.113.8"))
        clock.advance(10)
        self.assertIsNone(limits.admit("203.0.113.7"))

    def test_no_penalty_when_limits_off(self):
        """With per-address limits off, a penalty is not applied (every client may share one)."""
        limits = AddressLimits(task.Clock(), 0, 0)
        limits.penalise("10.0.0.1", 10)
        self.assertIsNone(limits.admit("10.0.0.1"))

    def test_sweep_forgets_lapsed(self):
        """The sweep forgets lapsed penalties."""
        clock = task.Clock()
        limits = AddressLimits(clock, 10, 10)
        limits.penalise("203.0.113.7", 10)
        clock.advance(11)
        limits.sweep()
        self.assertEqual(limits._penalties, {})
