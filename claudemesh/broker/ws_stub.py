"""
A placeholder WebSocket protocol for C{/ws} until the broker core is wired.

It completes the WebSocket handshake (so clients, proxies and the liveness
options can be exercised end to end) and answers every frame with an
C{error unavailable}. The real protocol (L{claudemesh.broker.ws}) replaces it
in L{claudemesh.broker.tap.makeService}.
"""

import json

from autobahn.twisted.websocket import WebSocketServerProtocol

UNAVAILABLE_FRAME = json.dumps(
    {
        "type": "error",
        "code": "unavailable",
        "message": "the broker core is not wired yet",
    },
    separators=(",", ":"),
).encode("utf-8")


class UnwiredBrokerProtocol(WebSocketServerProtocol):
    """
    Answer every text or binary frame with one C{error unavailable} frame.
    """

    def onMessage(self, payload, isBinary):
        self.sendMessage(UNAVAILABLE_FRAME, isBinary=False)
