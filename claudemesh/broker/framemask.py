"""
Unmasking inbound WebSocket frames at a few microseconds a frame.

Every frame a client sends is masked with a 4-byte key (RFC 6455, section
5.3). Autobahn 26 builds a new cffi masker for every frame
(C{autobahn.nvx._xormasker.XorMaskerNvx}: an import, C{ffi.new}, C{ffi.gc}
and an implementation switch per frame); the bench's profile of a burst put
a fifth of the reactor thread's samples in that constructor alone
(docs/performance.md). For the frames a broker sees — a few hundred bytes —
XOR-ing the payload as one big integer against the repeated key is cheaper
than building the native masker, and correct for any length.

L{install} puts L{create_xor_masker} in place of Autobahn's factory in the
module that frames and unframes (C{autobahn.websocket.protocol}, which
imported the name); L{claudemesh.broker.ws.configure_ws_factory} calls it,
so the broker and the bench's relay, which share that configuration, run
the same stack.
"""

import autobahn.websocket.protocol as _autobahn_protocol


class IntXorMasker:
    """
    A masker with Autobahn's interface (C{pointer}, C{reset}, C{process}):
    C{process} may be called on successive chunks of one payload, and
    continues the key where the previous chunk stopped.
    """

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask):
        if len(mask) != 4:
            raise ValueError("a WebSocket mask is 4 bytes")
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self):
        return self._ptr

    def reset(self):
        self._ptr = 0

    def process(self, data):
        length = len(data)
        if not length:
            return b""
        mask = self._mask
        offset = self._ptr & 3
        if offset:
            mask = mask[offset:] + mask[:offset]
        self._ptr += length
        key = (mask * ((length >> 2) + 1))[:length]
        return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def create_xor_masker(mask, length=None):
    """
    Autobahn's C{create_xor_masker(mask, length)}, answered with an
    L{IntXorMasker} whatever the length.
    """
    return IntXorMasker(mask)


def install():
    """
    Use L{create_xor_masker} for every frame Autobahn masks or unmasks from
    now on (idempotent).
    """
    _autobahn_protocol.create_xor_masker = create_xor_masker
