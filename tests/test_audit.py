"""
Tests for L{claudemesh.audit}: the canonical JSON and the chain hash must
match the original broker byte for byte, so these pin the exact output.
"""

import hashlib

from twisted.trial.unittest import TestCase

from claudemesh.audit import GENESIS, canonical_json, chain_hash, iso_millis


class CanonicalJSONTests(TestCase):
    """
    Tests for L{canonical_json}.
    """

    def test_key_order_irrelevant(self):
        """Keys are sorted at every depth, whatever order they were given in."""
        one = {"b": {"y": 1, "x": [{"d": 1, "c": 2}]}, "a": None}
        two = {"a": None, "b": {"x": [{"c": 2, "d": 1}], "y": 1}}
        self.assertEqual(canonical_json(one), canonical_json(two))
        self.assertEqual(
            canonical_json(one), '{"a":null,"b":{"x":[{"c":2,"d":1}],"y":1}}'
        )

    def test_array_order_matters(self):
        """Arrays keep their order."""
        self.assertEqual(canonical_json([2, 1]), "[2,1]")
        self.assertNotEqual(canonical_json([1, 2]), canonical_json([2, 1]))

    def test_integral_floats(self):
        """Integral floats are written as integers, as JavaScript prints them."""
        self.assertEqual(canonical_json({"n": 1.0, "m": [2.0, -0.0]}), '{"m":[2,0],"n":1}')
        self.assertEqual(canonical_json(1.5), "1.5")

    def test_unicode_kept(self):
        """Non-ASCII text is kept as UTF-8, not escaped."""
        self.assertEqual(canonical_json({"é": "日本"}), '{"é":"日本"}')

    def test_compact(self):
        """No whitespace between tokens; tuples are arrays; booleans are JSON's."""
        self.assertEqual(canonical_json({"a": (1, True, "x y")}), '{"a":[1,true,"x y"]}')


class IsoMillisTests(TestCase):
    """
    Tests for L{iso_millis}.
    """

    def test_epoch(self):
        """The epoch is formatted with milliseconds and Z."""
        self.assertEqual(iso_millis(0), "1970-01-01T00:00:00.000Z")

    def test_millis(self):
        """Milliseconds are kept, zero-padded to three digits."""
        self.assertEqual(iso_millis(1_776_254_400_007), "2026-04-15T12:00:00.007Z")
        self.assertEqual(iso_millis(1_776_254_400_999), "2026-04-15T12:00:00.999Z")


class ChainHashTests(TestCase):
    """
    Tests for L{chain_hash}.
    """

    ARGS = (GENESIS, "mesh-1", "member.joined", "member-1", {"role": "admin"}, 0)

    def test_value(self):
        """The hash is sha256 of the fields joined with |, actor null when missing."""
        text = 'genesis|mesh-1|member.joined|null|{"a":1}|1970-01-01T00:00:00.001Z'
        self.assertEqual(
            chain_hash(GENESIS, "mesh-1", "member.joined", None, {"a": 1.0}, 1),
            hashlib.sha256(text.encode("utf-8")).hexdigest(),
        )

    def test_every_field_counts(self):
        """Changing any one field changes the hash."""
        base = chain_hash(*self.ARGS)
        variants = [
            ("0" * 64,) + self.ARGS[1:],
            self.ARGS[:1] + ("mesh-2",) + self.ARGS[2:],
            self.ARGS[:2] + ("member.left",) + self.ARGS[3:],
            self.ARGS[:3] + (None,) + self.ARGS[4:],
            self.ARGS[:4] + ({"role": "member"},) + self.ARGS[5:],
            self.ARGS[:5] + (1,),
        ]
        hashes = {chain_hash(*args) for args in variants}
        self.assertEqual(len(hashes), len(variants))
        self.assertNotIn(base, hashes)

    def test_payload_key_order_irrelevant(self):
        """The payload is hashed in canonical form."""
        self.assertEqual(
            chain_hash(GENESIS, "m", "t", None, {"a": 1, "b": 2}, 0),
            chain_hash(GENESIS, "m", "t", None, {"b": 2, "a": 1.0}, 0),
        )
