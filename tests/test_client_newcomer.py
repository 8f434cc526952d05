"""
Client-library behaviour behind issue 13 (a newcomer's first hour), without
a network: the frame size limit from C{hello_ack} and after a 1009 close,
the mesh key check value and the compact invite form, broker URL
normalisation, the default mesh, and the CLI's spinner. L{task.Clock} and
fake connections only.
"""

import io
import json

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from claudemesh import crypto
from claudemesh import invite as invites
from claudemesh.cli import spinner
from claudemesh.client import config, connection, messages
from tests.test_client_units import _FakeEndpoint, _FakeProto, make_entry

PEER = crypto.Identity.generate().pubkey


class SizeLimitTests(SynchronousTestCase):
    """
    A message bigger than the broker takes fails at once, and is never re-sent.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.attempts = []
        self.client = connection.MeshClient(
            self.clock, make_entry(), "cli-1", receive=False, random=lambda: 0.5,
            endpoint_factory=lambda r, u, t: _FakeEndpoint(self))

    def connect(self, **ack):
        factory, d = self.attempts[-1]
        proto = _FakeProto()
        d.callback(proto)
        self.client._opened(proto)
        frame = dict({"type": "hello_ack", "role": "member", "_reqId": "hello"}, **ack)
        self.client._received(proto, json.dumps(frame).encode())
        return proto

    def sends(self, proto):
        return [f for f in proto.sent if f["type"] == "send"]

    def test_announced_limit_refuses_before_writing(self):
        """Over maxMessageBytes: MessageTooLarge naming both sizes, nothing written."""
        self.client.start()
        proto = self.connect(maxMessageBytes=4096)
        d = self.client.send_text(PEER, "x" * 5000)
        e = self.failureResultOf(d, connection.MessageTooLarge).value
        self.assertEqual(self.sends(proto), [])
        self.assertEqual((e.limit, e.text_bytes), (4096, 5000))
        self.assertGreater(e.frame_bytes, 4096)
        self.assertIn("5,000 bytes of text", e.message)
        self.assertIn("at most 4,096 bytes per frame", e.message)

    def test_largest_fitting_text_is_sent(self):
        """The 'about N bytes of text' in the error is exact: N fits, N + 3 does not."""
        self.client.start()
        proto = self.connect(maxMessageBytes=4096)
        e = self.failureResultOf(self.client.send_text(PEER, "x" * 5000),
                                 connection.MessageTooLarge).value
        self.client.send_text(PEER, "x" * e.max_text_bytes, send_id="fits")
        self.assertEqual([f["id"] for f in self.sends(proto)], ["fits"])
        self.assertLessEqual(len(connection.encode_frame(self.sends(proto)[0])), 4096)
        # base64 grows in steps of 3 bytes.
        self.failureResultOf(self.client.send_text(PEER, "x" * (e.max_text_bytes + 3)),
                             connection.MessageTooLarge)

    def test_close_1009_fails_the_large_send_only(self):
        """Without an announced limit, a 1009 close fails the big send; the small one is re-sent."""
        self.client.start()
        proto = self.connect()
        small = self.client.send_text(PEER, "hi", send_id="small")
        big = self.client.send_text(PEER, "x" * 100_000, send_id="big")
        self.client._closed(proto, True, 1009, "message too big")
        self.failureResultOf(big, connection.MessageTooLarge)
        self.clock.advance(1)
        second = self.connect()
        self.assertEqual([f["id"] for f in self.sends(second)], ["small"])
        self.assertNoResult(small)
        # What 1009 taught stays: the same size fails at once now.
        self.failureResultOf(self.client.send_text(PEER, "x" * 100_000),
                             connection.MessageTooLarge)

    def test_disconnect_callback(self):
        """on_disconnect hears a working connection's loss, not a failed first attempt."""
        lost = []
        self.client.on_disconnect = lambda code, reason: lost.append((code, reason))
        self.client.start()
        factory, d = self.attempts[-1]
        first = _FakeProto()
        d.callback(first)
        self.client._opened(first)
        self.client._closed(first, False, 1006, None)
        self.assertEqual(lost, [])
        self.clock.advance(1)
        proto = self.connect()
        self.client._closed(proto, False, 1006, None)
        self.assertEqual(lost, [(1006, None)])

    def test_presence_and_groups_in_hello(self):
        """presence=False and the entry's groups go into the hello."""
        entry = make_entry(groups=[{"name": "devs"}])
        client = connection.MeshClient(
            self.clock, entry, "cli-2", receive=True, presence=False,
            endpoint_factory=lambda r, u, t: _FakeEndpoint(self))
        client.start()
        factory, d = self.attempts[-1]
        proto = _FakeProto()
        d.callback(proto)
        client._opened(proto)
        hello = proto.sent[0]
        self.assertEqual((hello["presence"], hello["receive"], hello["groups"]),
                         (False, True, [{"name": "devs"}]))


class MeshKeyCheckTests(SynchronousTestCase):
    """
    The invite carries a check value of the mesh key that join verifies.
    """

    def setUp(self):
        self.inviter = crypto.Identity.generate()
        self.key = crypto.new_mesh_key()
        self.mesh_id = "0" * 31 + "1"
        self.invite = messages.make_invite(self.inviter, self.mesh_id, "Team", "a" * 32,
                                           "member", 1_900_000_000, "ws://h:1/ws", self.key)

    def test_check_value_reveals_nothing_obvious(self):
        """The check value is 32 hex, differs per mesh, and does not contain the key."""
        check = self.invite["meshKeyCheck"]
        self.assertTrue(crypto.is_mesh_key_check(check))
        self.assertNotEqual(check, crypto.mesh_key_check(self.key, "other"))
        self.assertNotIn(self.key.hex()[:16], check)

    def test_right_key_verified(self):
        """The key of the link matches: parsed with key_checked True."""
        parsed = messages.parse_invite_link(messages.invite_link(self.invite, self.key))
        self.assertIs(parsed.key_checked, True)

    def test_changed_key_refused(self):
        """One character changed after '#': join refuses, saying to copy the link again."""
        link = messages.invite_link(self.invite, self.key)
        head, key = link.split("#")
        altered = head + "#" + ("A" if key[0] != "A" else "B") + key[1:]
        e = self.assertRaises(messages.InviteError, messages.parse_invite_link, altered)
        self.assertIn("does not match this invite", str(e))
        self.assertIn("ask the mesh owner", str(e))

    def test_stripped_check_breaks_the_signature(self):
        """Removing meshKeyCheck from a signed invite makes its signature fail."""
        stripped = dict(self.invite)
        del stripped["meshKeyCheck"]
        self.assertFalse(invites.verify_invite(stripped))

    def test_old_invite_still_joins(self):
        """An invite without the field (signed over the old string) parses, unverified."""
        old = invites.sign_invite(self.inviter, self.mesh_id, "Team", "a" * 32, "member",
                                  1_900_000_000, "ws://h:1/ws")
        self.assertNotIn("meshKeyCheck", old)
        parsed = messages.parse_invite_link(messages.invite_link(old, self.key))
        self.assertIsNone(parsed.key_checked)

    def test_compact_form_round_trip(self):
        """The compact link holds the same invite, is about half as long, and parses."""
        full = messages.invite_link(self.invite, self.key)
        compact = messages.compact_invite_link(self.invite, self.key)
        self.assertLess(len(compact), len(full) * 0.6)
        parsed = messages.parse_invite_link(compact)
        self.assertEqual(parsed.invite, self.invite)
        self.assertEqual(invites.decode_token(parsed.token), self.invite)
        self.assertIs(parsed.key_checked, True)

    def test_damaged_compact_token(self):
        """A truncated compact token is refused with a message, never a traceback."""
        compact = messages.compact_invite_link(self.invite, self.key)
        head, key = compact.split("#")
        for cut in (5, 40, len(head) - 3):
            e = self.assertRaises(messages.InviteError, messages.parse_invite_link,
                                  head[:cut] + "#" + key)
            self.assertIn("copy the whole link", str(e).lower())

    def test_entry_key_verified(self):
        """A config entry compares its key with its check value."""
        entry = make_entry(meshId=self.mesh_id, meshKey=crypto.encode_mesh_key(self.key),
                           meshKeyCheck=self.invite["meshKeyCheck"])
        self.assertIs(entry.key_verified(), True)
        other = make_entry(meshId=self.mesh_id, meshKeyCheck=self.invite["meshKeyCheck"])
        self.assertIs(other.key_verified(), False)
        self.assertIsNone(make_entry().key_verified())


class BrokerURLTests(SynchronousTestCase):
    """
    A broker URL is normalised to ws[s]://host[:port]/ws or refused with the right form.
    """

    def test_normalised(self):
        """No path, '/', http(s) and a trailing slash become the /ws URL."""
        for given, wanted in (("ws://localhost:7900", "ws://localhost:7900/ws"),
                              ("ws://localhost:7900/", "ws://localhost:7900/ws"),
                              ("http://h:1", "ws://h:1/ws"),
                              ("https://example.com/ws/", "wss://example.com/ws"),
                              ("wss://example.com/ws", "wss://example.com/ws")):
            self.assertEqual(messages.normalise_broker_url(given),
                             (wanted, given != wanted), given)

    def test_refused(self):
        """Another scheme, path, a bad port or no host is refused, naming the right form."""
        for given in ("ftp://h/ws", "ws://h:1/socket", "ws://h:x/ws", "ws:///ws", "h:1",
                      "ws://h/ws?token=1"):
            e = self.assertRaises(ValueError, messages.normalise_broker_url, given)
            self.assertTrue("ws://" in str(e) or "port" in str(e), (given, str(e)))


class DefaultMeshTests(SynchronousTestCase):
    """
    --mesh, then $CLAUDEMESH_MESH, then 'use', then the only mesh.
    """

    def setUp(self):
        self.config = config.Config()
        for slug in ("a", "b"):
            self.config.put(make_entry(slug))

    def test_order(self):
        """Each source wins over the ones after it; an unknown name is an error naming it."""
        self.assertRaises(config.ConfigError, config.choose, self.config, None, {})
        self.config.defaultMesh = "b"
        self.assertEqual(config.choose(self.config, None, {}).slug, "b")
        self.assertEqual(config.choose(self.config, None, {"CLAUDEMESH_MESH": "a"}).slug, "a")
        self.assertEqual(config.choose(self.config, "b", {"CLAUDEMESH_MESH": "a"}).slug, "b")
        e = self.assertRaises(config.ConfigError, config.choose, self.config, None,
                              {"CLAUDEMESH_MESH": "zz"})
        self.assertIn("CLAUDEMESH_MESH", str(e))

    def test_saved_and_forgotten(self):
        """defaultMesh survives a save and load, and goes with its mesh."""
        directory = self.mktemp()
        self.config.defaultMesh = "a"
        config.save(directory, self.config)
        loaded = config.load(directory)
        self.assertEqual(loaded.defaultMesh, "a")
        loaded.remove("a")
        self.assertIsNone(loaded.defaultMesh)


class _TTY(io.StringIO):
    def isatty(self):
        return True


class SpinnerTests(SynchronousTestCase):
    """
    The spinner draws on a terminal only, and erases itself.
    """

    def test_terminal(self):
        """On a terminal it redraws every 0.1 s and erases its line at the end."""
        clock, stream = task.Clock(), _TTY()
        s = spinner.Spinner(clock, stream, "waiting", environ={})
        clock.pump([0.1, 0.1])
        s.stop()
        text = stream.getvalue()
        self.assertEqual(text.count("waiting"), 3)
        self.assertTrue(text.endswith("\r\x1b[K"))

    def test_not_a_terminal(self):
        """Piped (or TERM=dumb), it writes nothing at all."""
        clock = task.Clock()
        for stream, environ in ((io.StringIO(), {}), (_TTY(), {"TERM": "dumb"})):
            s = spinner.Spinner(clock, stream, "waiting", environ=environ)
            clock.advance(1)
            s.stop()
            self.assertEqual(stream.getvalue(), "")


class _PagedClient:
    """
    Answers list_members in pages of two rows, as a broker with a small frame limit would.
    """

    def __init__(self, rows):
        self.rows = rows
        self.frames = []

    def request(self, frame, timeout=None):
        from twisted.internet import defer

        self.frames.append(frame)
        start = int(frame.get("cursor") or 0)
        reply = {"type": "members_list", "members": self.rows[start:start + 2]}
        if start + 2 < len(self.rows):
            reply["nextCursor"] = str(start + 2)
        return defer.succeed(reply)


class PagingTests(SynchronousTestCase):
    """
    The CLI follows nextCursor, so members/peers/invites list every row.
    """

    def test_every_page(self):
        """Five rows in pages of two: three requests, all five rows, no cursor left."""
        from claudemesh.cli import session

        client = _PagedClient([{"name": str(i)} for i in range(5)])
        reply = self.successResultOf(session.request_all(client, {"type": "list_members"}))
        self.assertEqual([m["name"] for m in reply["members"]], ["0", "1", "2", "3", "4"])
        self.assertNotIn("nextCursor", reply)
        self.assertEqual([f.get("cursor") for f in client.frames], [None, "2", "4"])
