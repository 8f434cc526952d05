"""
A broker core on a memory store and a fake clock, with meshes whose members
hold real ed25519 keys, for tests that drive the core without sockets.
"""

import json

from twisted.internet import task
from zope.interface import implementer

from claudemesh import crypto, protocol
from claudemesh.broker.core import Broker, IPeerConnection
from claudemesh.broker.metrics import BrokerMetrics
from claudemesh.broker.settings import BrokerSettings
from claudemesh.store.memory import MemoryStore
from claudemesh.store.records import MemberRecord, MeshRecord

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

    @property
    def pubkey(self):
        return self.identity.pubkey

    def hello_dict(self, session_id="s1", session_key=False, timestamp=None, **extra):
        now = self.fixture.now_ms() if timestamp is None else timestamp
        frame = {
            "type": "hello",
            "meshId": self.mesh.id,
            "memberId": self.member.id,
            "pubkey": self.identity.pubkey,
            "sessionId": session_id,
            "pid": 4242,
            "cwd": "/home/%s/project" % (self.member.display_name,),
            "timestamp": now,
            "signature": self.identity.sign(
                crypto.hello_string(self.mesh.id, self.member.id, self.identity.pubkey, now)),
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
        d = self.fixture.broker.hello(connection, hello)
        d.addBoth(results.append)
        self.fixture.flush()
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        session, ack = result
        self.session, self.connection = session, connection
        self.fixture.broker.session_ready(session)
        self.fixture.flush()
        return ack

    def request(self, frame_dict):
        """
        Run one frame through the core as the WebSocket protocol would;
        returns the reply (or the Refusal instance).
        """
        frame = protocol.decode(json.dumps(frame_dict))
        method = getattr(self.fixture.broker, frame.TYPE)
        from twisted.internet import defer

        results = []
        defer.maybeDeferred(method, self.session, frame).addBoth(results.append)
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
        self.fixture.broker.connection_lost(self.session, self.connection, clean=False)
        self.fixture.flush()

    def leave(self):
        """
        The client closes its connection cleanly.
        """
        self.fixture.broker.connection_lost(self.session, self.connection, clean=True)
        self.fixture.flush()

    def ack_all(self):
        for push in self.connection.messages():
            self.request({"type": "client_ack", "messageId": push["messageId"]})


class BrokerFixture:
    """
    A broker on a L{MemoryStore} and a L{task.Clock}.
    """

    def __init__(self, store=None, **settings):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.store = store if store is not None else MemoryStore()
        self.settings = BrokerSettings(**settings)
        self.metrics = BrokerMetrics()
        self.broker = Broker(self.store, self.clock, self.settings, self.metrics)
        # Started so its clock-driven sweeps (status decay, leases) run.
        self.broker.startService()
        self._counter = 0

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
        cached = self.broker.cached_mesh(owner_peer.mesh.id)
        if cached is not None:
            cached.put_member(member)
        self.flush()
        return Peer(self, owner_peer.mesh, member, identity)
