"""
A broker core on an inline SQLite store and a fake clock, with meshes whose members
hold real ed25519 keys, for tests that drive the core without sockets.
"""

import json

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import task
from zope.interface import implementer

from claudemesh import crypto, protocol
from claudemesh.broker.core import Broker, IPeerConnection
from claudemesh.broker.metrics import BrokerMetrics
from claudemesh.broker.settings import BrokerSettings
from claudemesh.store.records import MemberRecord, MeshRecord
from claudemesh.store.sqlite import SQLiteStore
from soak.harness import ClientProtocol

# A fixed, realistic wall-clock start (2026-11-28), so ISO times look real.
START = 1_795_000_000.0


@implementer(IPeerConnection)
class FakeConnection:
    """
    Records what the broker sends to one client.
    """

    peer_address = "127.0.0.1"

    def __init__(self):
        self.frames = []
        self.closed = None

    def send(self, frame):
        self.frames.append(json.loads(protocol.encode(frame)))

    def send_encoded(self, payload):
        self.frames.append(json.loads(payload))

    def close(self, code, reason):
        if self.closed is None:
            self.closed = (code, reason)

    def of_type(self, type_name):
        return [f for f in self.frames if f["type"] == type_name]

    def messages(self):
        """
        The message pushes received (system events left out).
        """
        return [f for f in self.frames if f["type"] == "push" and "subtype" not in f]

    def events(self, name=None):
        return [f for f in self.frames if f["type"] == "push" and f.get("subtype") == "system"
                and (name is None or f["event"] == name)]

    def clear(self):
        del self.frames[:]


class Peer:
    """
    A member identity (and optionally a session key) with its connection.
    """

    def __init__(self, fixture, mesh, member, identity):
        self.fixture = fixture
        self.mesh = mesh
        self.member = member
        self.identity = identity
        self.session = None
        self.connection = None
        self.session_identity = None
        self._last_hello = 0

    @property
    def pubkey(self):
        return self.identity.pubkey

    def hello_dict(self, session_id="s1", session_key=False, timestamp=None, **extra):
        if timestamp is None:
            # A client signs each hello at a later time than the last (the
            # broker refuses the same signed hello twice, as a replay); on a
            # fake clock that stands still, one millisecond later.
            timestamp = max(self.fixture.now_ms(), self._last_hello + 1)
            self._last_hello = timestamp
        now = timestamp
        frame = {
            "type": "hello",
            "meshId": self.mesh.id,
            "memberId": self.member.id,
            "pubkey": self.identity.pubkey,
            "sessionId": session_id,
            "pid": 4242,
            "cwd": "/home/%s/project" % (self.member.display_name,),
            "timestamp": now,
            # The tagged form, which binds the session id: two sessions of
            # one member saying hello in the same millisecond sign apart.
            "signature": self.identity.sign(crypto.hello_string(
                self.mesh.id, self.member.id, self.identity.pubkey, now, session_id)),
        }
        if session_key:
            if self.session_identity is None:
                self.session_identity = crypto.Identity.generate()
            key = self.session_identity.pubkey
            frame["sessionPubkey"] = key
            frame["sessionSignature"] = self.identity.sign(
                crypto.session_proof_string(self.mesh.id, self.identity.pubkey, key))
        frame.update(extra)
        return frame

    def connect(self, **kwargs):
        """
        Say hello on a new connection; returns the hello_ack (or raises the
        refusal).
        """
        connection = FakeConnection()
        hello = protocol.decode(json.dumps(self.hello_dict(**kwargs)))
        results = []
        d = self.fixture.broker.presence.hello(connection, hello)
        d.addBoth(results.append)
        self.fixture.flush()
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        session, ack = result
        self.session, self.connection = session, connection
        self.fixture.broker.presence.ready(session)
        self.fixture.flush()
        return ack

    def request(self, frame_dict):
        """
        Run one frame through the core as the WebSocket protocol would;
        returns the reply (or the Refusal instance).
        """
        frame = protocol.decode(json.dumps(frame_dict))
        handler = self.fixture.broker.handlers()[frame.TYPE]
        from twisted.internet import defer

        # As the dispatcher does: every application frame is activity.
        self.session.last_active_at = self.fixture.now_ms()
        results = []
        defer.maybeDeferred(handler, self.session, frame).addBoth(results.append)
        self.fixture.flush()
        result = results[0] if results else None
        if hasattr(result, "value"):
            return result.value
        return result

    def send(self, target, plaintext=b"hello", priority="next", client_id=None, mesh_key=None):
        if target in ("*", "@all") or target.startswith("@"):
            nonce, ciphertext = crypto.encrypt_broadcast(mesh_key or b"k" * 32, plaintext)
        else:
            sender = self.session_identity or self.identity
            nonce, ciphertext = crypto.encrypt_direct(sender, target, plaintext)
        frame = {"type": "send", "targetSpec": target, "priority": priority,
                 "nonce": nonce, "ciphertext": ciphertext}
        if client_id is not None:
            frame["id"] = client_id
        return self.request(frame)

    def drop(self):
        """
        The network drops this peer's connection (no close frame).
        """
        self.fixture.broker.presence.connection_lost(self.session, self.connection, clean=False)
        self.fixture.flush()

    def leave(self):
        """
        The client closes its connection cleanly.
        """
        self.fixture.broker.presence.connection_lost(self.session, self.connection, clean=True)
        self.fixture.flush()

    def ack_all(self):
        for push in self.connection.messages():
            self.request({"type": "client_ack", "messageId": push["messageId"]})


class BrokerFixture:
    """
    A broker on an inline SQLite store (L{SQLiteStore.inline}: the real SQL,
    answered at once) and a L{task.Clock}.
    """

    def __init__(self, store=None, clock=None, backplane=None, node_name="broker", **settings):
        """
        @param clock: shared by the nodes of an in-process cluster (issue
            15), with their C{store} and a C{backplane} of one L{LocalHub}.
        """
        if clock is None:
            clock = task.Clock()
            clock.advance(START)
        self.clock = clock
        self.store = store if store is not None else inline_store()
        self.settings = BrokerSettings(**settings)
        self.metrics = BrokerMetrics()
        self.broker = Broker(self.store, self.clock, self.settings, self.metrics,
                             backplane=backplane, node_name=node_name)
        # Started so its clock-driven sweeps (status decay, leases) run.
        self.broker.startService()
        self._counter = 0
        self._ports = 0

    def _next_port(self):
        self._ports += 1
        return self._ports

    def now_ms(self):
        return int(self.clock.seconds() * 1000)

    def flush(self):
        """
        Run everything due now (the group commit flushes on the next turn).
        """
        for _ in range(50):
            if not [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]:
                break
            self.clock.advance(0)

    def advance(self, seconds):
        """
        Let C{seconds} pass in steps, running every timer on the way.
        """
        step = 1.0
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            self.flush()

    def _id(self, prefix):
        self._counter += 1
        return "%s%04d" % (prefix, self._counter)

    def create_mesh(self, name="team", owner_name="owner"):
        """
        A mesh and its owner; returns the owner's L{Peer}.
        """
        identity = crypto.Identity.generate()
        mesh = MeshRecord(self._id("mesh"), name, name.lower(), identity.pubkey, self.now_ms())
        owner = MemberRecord(self._id("mem"), mesh.id, identity.pubkey, owner_name, "owner",
                             self.now_ms())
        done = []
        self.store.create_mesh(mesh, owner).addBoth(done.append)
        self.flush()
        return Peer(self, mesh, owner, identity)

    def add_member(self, owner_peer, name, role="member"):
        identity = crypto.Identity.generate()
        member = MemberRecord(self._id("mem"), owner_peer.mesh.id, identity.pubkey, name, role,
                              self.now_ms())
        self.store.add_member(member)
        cached = self.broker.meshes.cached(owner_peer.mesh.id)
        if cached is not None:
            cached.put_member(member)
        self.flush()
        return Peer(self, owner_peer.mesh, member, identity)


# -- helpers shared by the newer test modules ---------------------------------


def inline_store():
    """
    A new, open L{SQLiteStore.inline} on C{:memory:}.
    """
    store = SQLiteStore.inline()
    result_of(store.open())
    return store


def result_of(d):
    """
    The result of an already-fired L{Deferred} (the inline store answers at
    once); raises the failure's exception.
    """
    results = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("%r has not fired" % (d,))
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def store_snapshot(store):
    """
    Everything an inline L{SQLiteStore} holds, as the SQL dump of its
    database (comparable with C{==}), for asserting that an error path
    changed nothing stored.
    """
    store = getattr(store, "_store", store)
    return result_of(store._connection.run(lambda connection: list(connection.iterdump())))


def audit_rows(fixture, mesh_id):
    """
    Every audit entry of a mesh, oldest first, once the writes are flushed.
    """
    fixture.flush()
    entries, _ = result_of(fixture.store.audit_entries(mesh_id, 10_000, 0))
    return list(reversed(entries))


class FailingEnqueueStore:
    """
    A store wrapper whose C{enqueue} fails while C{failing} is set,
    as a database that went away would.
    """

    def __init__(self, store=None):
        self._store = store if store is not None else inline_store()
        self.failing = False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def enqueue(self, messages, audit=()):
        if self.failing:
            from twisted.internet import defer

            from claudemesh.store.interface import StoreUnavailable

            return defer.fail(StoreUnavailable("the database is gone"))
        return self._store.enqueue(messages, audit)

    def write_batch(self, batch):
        if self.failing and batch.messages:
            from twisted.internet import defer

            from claudemesh.store.interface import StoreUnavailable

            return defer.fail(StoreUnavailable("the database is gone"))
        return self._store.write_batch(batch)


class HeldClaimsStore:
    """
    A store wrapper whose batches holding a claim are answered only when the
    test says so (C{hold} set), as a database round trip in flight would:
    C{held} collects C{(Deferred, outcome)} pairs, the batch already
    written, its answer not yet delivered.
    """

    def __init__(self, store=None):
        self._store = store if store is not None else inline_store()
        self.hold = False
        self.held = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def write_batch(self, batch):
        d = self._store.write_batch(batch)
        if not (self.hold and batch.claims):
            return d
        from twisted.internet import defer

        waiting = defer.Deferred()
        self.held.append((waiting, result_of(d)))
        return waiting


def client_factory(url, reactor, max_message_bytes=0):
    """
    A client factory for the one WebSocket test client
    (L{soak.harness.ClientProtocol}), configured like the broker's so closes
    are seen as sent (no drop on a protocol failure).
    """
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = ClientProtocol
    factory.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=max_message_bytes,
                               maxFramePayloadSize=max_message_bytes)
    factory.noisy = False
    return factory


class WireConnection:
    """
    A real L{BrokerServerProtocol} and a real Autobahn client joined by
    in-memory transports (L{twisted.test.iosim}), pumped on the fixture's
    clock: the WebSocket layer without sockets or the global reactor.
    """

    def __init__(self, fixture, server_factory):
        from twisted.internet.address import IPv4Address
        from twisted.test import iosim

        self.fixture = fixture
        server_address = IPv4Address("TCP", "127.0.0.1", 7777)
        client_address = IPv4Address("TCP", "127.0.0.1", 40000 + fixture._next_port())
        self.server = server_factory.buildProtocol(client_address)
        factory = client_factory("ws://127.0.0.1:7777/ws", fixture.clock)
        self.client = factory.buildProtocol(server_address)
        self._pump = iosim.connect(
            self.server, iosim.FakeTransport(self.server, True, server_address, client_address),
            self.client, iosim.FakeTransport(self.client, False, client_address, server_address),
            clock=fixture.clock)
        if not hasattr(fixture, "wires"):
            fixture.wires = []
        fixture.wires.append(self)
        self.pump()

    def pump(self):
        """
        Move bytes both ways on every wire of the fixture and run what is
        due on the clock, until quiet.
        """
        for _ in range(100):
            for wire in self.fixture.wires:
                wire._pump.flush()
            self.fixture.flush()
            if not any([wire._pump.flush() for wire in self.fixture.wires]):
                break

    @property
    def frames(self):
        return self.client.frames

    def send(self, frame):
        self.client.send_frame(frame)
        self.pump()

    def send_raw(self, payload, binary=False):
        self.client.sendMessage(payload, isBinary=binary)
        self.pump()

    def last(self):
        return self.client.frames[-1]

    def close(self, code=1000):
        self.client.sendClose(code)
        self.pump()
