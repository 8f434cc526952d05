"""
Tests for L{claudemesh.broker.framemask}: the masker the broker gives
Autobahn unmasks exactly as RFC 6455 says, whole or in chunks.
"""

import os

import autobahn.websocket.protocol as autobahn_protocol
from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.xormasker import create_xor_masker as autobahn_masker
from twisted.trial import unittest

from claudemesh.broker import framemask
from claudemesh.broker.settings import BrokerSettings
from claudemesh.broker.ws import configure_ws_factory


def reference(mask, data):
    """RFC 6455 section 5.3: octet i XOR octet i mod 4 of the key."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class IntXorMaskerTests(unittest.TestCase):
    def test_whole_payloads(self):
        """Payloads of every length class come out as RFC 6455 masks them."""
        for length in (1, 3, 4, 5, 125, 126, 400, 65536, 70001):
            mask, data = os.urandom(4), os.urandom(length)
            masker = framemask.IntXorMasker(mask)
            self.assertEqual(masker.process(data), reference(mask, data), length)
            self.assertEqual(masker.pointer(), length)

    def test_chunks_continue_the_key(self):
        """A payload processed in chunks of odd sizes equals the whole, key phase kept."""
        mask, data = os.urandom(4), os.urandom(1000)
        masker = framemask.IntXorMasker(mask)
        pieces, start = [], 0
        for size in (1, 2, 3, 5, 7, 11, 13, 958):
            pieces.append(masker.process(memoryview(data)[start:start + size]))
            start += size
        self.assertEqual(b"".join(pieces), reference(mask, data))
        masker.reset()
        self.assertEqual(masker.pointer(), 0)
        self.assertEqual(masker.process(data[:9]), reference(mask, data[:9]))

    def test_empty_and_leading_zeros(self):
        """An empty payload and payloads that start with zero bytes keep their length."""
        masker = framemask.IntXorMasker(b"\x00\x00\x00\x00")
        self.assertEqual(masker.process(b""), b"")
        self.assertEqual(masker.process(b"\x00\x00\x01"), b"\x00\x00\x01")

    def test_same_as_autobahn(self):
        """The masker agrees with Autobahn's own on the same key and payload."""
        mask, data = os.urandom(4), os.urandom(300)
        self.assertEqual(framemask.IntXorMasker(mask).process(data),
                         autobahn_masker(mask, len(data)).process(data))

    def test_bad_mask(self):
        """A mask that is not 4 bytes is refused."""
        self.assertRaises(ValueError, framemask.IntXorMasker, b"abc")

    def test_configure_installs(self):
        """Configuring a broker factory puts the masker in Autobahn's framing."""
        self.patch(autobahn_protocol, "create_xor_masker", autobahn_masker)
        configure_ws_factory(WebSocketServerFactory(), BrokerSettings())
        self.assertIs(autobahn_protocol.create_xor_masker, framemask.create_xor_masker)
