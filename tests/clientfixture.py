"""
A real broker in-process on 127.0.0.1 (SQLite file store, the real
L{BrokerServerFactory} and Site), for the client library's tests, and
helpers to make members through the broker's own membership routes.

Only integration tests use this (it needs the global reactor).
"""

import os
import socket

from twisted.internet import defer

from claudemesh.broker.core import Broker
from claudemesh.broker.metrics import BrokerMetrics
from claudemesh.broker.settings import BrokerSettings
from claudemesh.broker.web import StoreHealth, make_site
from claudemesh.broker.ws import BrokerServerFactory, BrokerServerProtocol
from claudemesh.client import membership, messages
from claudemesh.store.sqlite import SQLiteStore


class TrackedServerProtocol(BrokerServerProtocol):
    """
    The broker's protocol, counting the server connections still open.
    """

    def connectionMade(self):
        BrokerServerProtocol.connectionMade(self)
        self.factory.live.add(self)

    def connectionLost(self, reason):
        BrokerServerProtocol.connectionLost(self, reason)
        self.factory.live.discard(self)
        if not self.factory.live:
            waiting, self.factory.waiting = self.factory.waiting, []
            for d in waiting:
                d.callback(None)


class InProcessBroker:
    """
    A broker listening on an ephemeral port of 127.0.0.1.
    """

    def __init__(self, reactor, directory, make_store=None, **settings):
        self.reactor = reactor
        self.path = os.path.join(directory, "broker.sqlite")
        # The embedded default; tests of the Postgres store pass their own.
        self.make_store = make_store or (lambda: SQLiteStore(self.path, self.reactor))
        self.settings = BrokerSettings(**settings)
        self.port = None
        self.store = None
        self.broker = None

    @defer.inlineCallbacks
    def start(self):
        self.store = self.make_store()
        yield self.store.open()
        self.broker = Broker(self.store, self.reactor, self.settings, BrokerMetrics())
        yield self.broker.store_opened()
        self.broker.startService()
        self.factory = BrokerServerFactory(self.broker, self.reactor, self.settings)
        self.factory.protocol = TrackedServerProtocol
        self.factory.live = set()
        self.factory.waiting = []
        site = self.site = make_site(StoreHealth(self.store, self.reactor), self.reactor,
                                     self.settings, ws_factory=self.factory, broker=self.broker)
        self.port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = "ws://127.0.0.1:%d/ws" % (self.port.getHost().port,)
        return self

    def server_gone(self):
        if not self.factory.live:
            return defer.succeed(None)
        d = defer.Deferred()
        self.factory.waiting.append(d)
        return d

    @defer.inlineCallbacks
    def stop(self):
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        for proto in list(self.factory.live):
            proto.dropConnection(abort=True)
        yield self.server_gone()
        if self.broker is not None:
            broker, self.broker = self.broker, None
            yield broker.stopService()
        if self.store is not None:
            store, self.store = self.store, None
            yield store.close()

    # -- members through the real routes -------------------------------------------

    def new_mesh(self, name="team", owner_name="owner"):
        """
        C{POST /meshes}; fires with the owner's L{MeshEntry}.
        """
        return membership.create_mesh(self.reactor, self.url, name, owner_name)

    @defer.inlineCallbacks
    def invite(self, owner_client, role="member", uses=1):
        """
        An invite link asked for by a connected owner's L{MeshClient}.
        """
        reply = yield owner_client.request(
            {"type": "create_invite", "role": role, "maxUses": uses, "expiresIn": 3600})
        entry = owner_client.mesh
        invite = messages.make_invite(entry.identity, entry.meshId, entry.name,
                                      reply["inviteId"], role, reply["expiresAt"],
                                      entry.brokerUrl)
        # The current key epoch's key, as claudemesh invite does.
        epoch, key = owner_client.mesh_keys.invite_key()
        return messages.invite_link(invite, key, epoch)

    @defer.inlineCallbacks
    def join(self, link, name):
        parsed = messages.parse_invite_link(link)
        entry = yield membership.join_mesh(self.reactor, parsed, name)
        return entry


def free_port():
    """
    A TCP port of 127.0.0.1 that nothing listened on a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
