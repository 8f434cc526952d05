"""
The relay ceiling: a minimal Autobahn (Twisted) relay speaking just enough of
the broker's protocol for the load generator.

It mounts the same Autobahn factory options at the same path (``/ws`` in a
``twisted.web`` site, configured by
:func:`claudemesh.broker.ws.configure_ws_factory`), parses every frame with
``json.loads`` and encodes every reply with the broker's
:func:`claudemesh.protocol.encode`, so what it measures is the stack
(Twisted, Autobahn, JSON) without the broker's logic and storage:

  - ``hello``: remembered by ``meshId`` and ``pubkey``, answered
    ``hello_ack`` (no signature check, no store);
  - ``send``: a ``push`` (encoded once) to the target's connection, or to
    every other connection of the mesh for ``*``, then ``ack`` — no
    storage, no leases, no retries;
  - ``client_ack``: ignored.

Run as ``python -m bench.relay --port tcp:PORT:interface=127.0.0.1``.
"""

import argparse
import datetime
import itertools
import json
import secrets
import sys

from twisted.internet import epollreactor

epollreactor.install()

from autobahn.twisted.resource import WebSocketResource  # noqa: E402
from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import serverFromString  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

from claudemesh.broker.settings import BrokerSettings  # noqa: E402
from claudemesh.broker.ws import configure_ws_factory  # noqa: E402
from claudemesh.protocol import encode  # noqa: E402


def _iso_now():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


class RelayProtocol(WebSocketServerProtocol):
    mesh = None
    key = None

    def onMessage(self, payload, isBinary):
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "send":
            self._send(msg)
        elif kind == "client_ack":
            return
        elif kind == "hello":
            factory = self.factory
            self.mesh_id = msg["meshId"]
            self.key = msg["pubkey"]
            self.mesh = factory.meshes.setdefault(self.mesh_id, {})
            self.mesh[self.key] = self
            reply = {"type": "hello_ack", "presenceId": secrets.token_hex(16),
                     "meshId": self.mesh_id, "memberId": msg.get("memberId"),
                     "serverTime": int(reactor.seconds() * 1000)}
            if "_reqId" in msg:
                reply["_reqId"] = msg["_reqId"]
            self.sendMessage(encode(reply))
        else:
            reply = {"type": "error", "code": "unknown_type", "message": "relay"}
            if "_reqId" in msg:
                reply["_reqId"] = msg["_reqId"]
            self.sendMessage(encode(reply))

    def _send(self, msg):
        target = msg["targetSpec"]
        mesh = self.mesh
        message_id = secrets.token_hex(16)
        push = encode({
            "type": "push", "messageId": message_id, "meshId": self.mesh_id,
            "senderPubkey": self.key, "senderMemberPubkey": self.key,
            "targetSpec": target, "priority": msg.get("priority", "next"),
            "nonce": msg["nonce"], "ciphertext": msg["ciphertext"],
            "createdAt": _iso_now(), "seq": next(self.factory.seq)})
        if target == "*" or target.startswith("@"):
            for other in mesh.values():
                if other is not self:
                    other.sendMessage(push)
            queued = True
        else:
            other = mesh.get(target)
            queued = other is not None
            if queued:
                other.sendMessage(push)
        ack = {"type": "ack", "id": msg.get("id") or "", "messageId": message_id,
               "queued": queued}
        if not queued:
            ack["error"] = "unknown_target"
        self.sendMessage(encode(ack))

    def onClose(self, wasClean, code, reason):
        if self.mesh is not None and self.mesh.get(self.key) is self:
            del self.mesh[self.key]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--port", required=True, help="a Twisted endpoint string")
    args = parser.parse_args(argv)
    factory = WebSocketServerFactory(server="claudemesh-bench-relay", reactor=reactor)
    factory.protocol = RelayProtocol
    factory.noisy = False
    factory.meshes = {}
    factory.seq = itertools.count(1)
    configure_ws_factory(factory, BrokerSettings())
    root = Resource()
    root.putChild(b"ws", WebSocketResource(factory))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None
    factory.doStart()
    serverFromString(reactor, args.port).listen(site)
    print("relay listening on %s" % (args.port,), file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
