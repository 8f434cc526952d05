"""
Tests for L{claudemesh.broker.ids}: the identifiers the broker makes.
"""

import re

from twisted.trial import unittest

from claudemesh.broker.ids import new_id, new_message_id
from claudemesh.protocol.codes import is_valid_id

HEX32 = re.compile(r"\A[0-9a-f]{32}\Z")


class IdTests(unittest.TestCase):
    def test_new_id(self):
        """Ids are 32 lowercase hex characters, all different."""
        ids = {new_id() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        self.assertTrue(all(HEX32.match(i) for i in ids))

    def test_message_id_starts_with_its_time(self):
        """A message id is 32 hex characters, the first 12 its creation time in ms."""
        now = 1_796_000_000_123
        message_id = new_message_id(now)
        self.assertTrue(HEX32.match(message_id), message_id)
        self.assertTrue(is_valid_id(message_id))
        self.assertEqual(int(message_id[:12], 16), now)

    def test_message_ids_sort_by_time(self):
        """Ids of later messages sort after earlier ones; within a millisecond they differ."""
        earlier = [new_message_id(1_000_000 + t) for t in range(50)]
        self.assertEqual(sorted(earlier), earlier)
        same = {new_message_id(5_000) for _ in range(1000)}
        self.assertEqual(len(same), 1000)

    def test_message_id_time_out_of_range(self):
        """A time beyond 48 bits (or negative) still gives a 32-character id."""
        for now in (2 ** 60, -1, 0):
            self.assertTrue(HEX32.match(new_message_id(now)), now)
