"""
Unit tests of the client library without a network or a real reactor:
config files, invite links, target resolution, opening pushes, backoff and
close-code decisions, and L{MeshClient}'s state machine on a L{task.Clock}.
"""

import json
import os
import stat

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from claudemesh import crypto
from claudemesh.client import config, connection, messages


def make_entry(slug="team", **overrides):
    identity = crypto.Identity.generate()
    values = dict(meshId="m1", memberId="u1", slug=slug, name="Team", pubkey=identity.pubkey,
                  secretKey=identity.secret_hex, brokerUrl="ws://127.0.0.1:1/ws",
                  joinedAt="2026-11-28T00:00:00.000Z",
                  meshKey=crypto.encode_mesh_key(crypto.new_mesh_key()), role="member",
                  displayName="alice")
    values.update(overrides)
    return config.MeshEntry(**values)


class ConfigTests(SynchronousTestCase):
    """
    config.json: location, shape, modes, and refusing what is not ours.
    """

    def setUp(self):
        self.dir = os.path.join(self.mktemp(), "cfg")

    def test_dir_from_environment(self):
        """CLAUDEMESH_CONFIG_DIR wins; otherwise ~/.claudemesh."""
        self.assertEqual(config.config_dir({"CLAUDEMESH_CONFIG_DIR": "/x/y"}), "/x/y")
        self.assertTrue(config.config_dir({}).endswith(os.sep + ".claudemesh"))

    def test_missing_is_empty(self):
        """A missing file reads as no meshes."""
        self.assertEqual(config.load(self.dir).meshes, [])

    def test_round_trip_and_modes(self):
        """A saved config reads back equal; the dir is 0700 and the file 0600."""
        cfg = config.Config()
        entry = make_entry()
        entry.extra["future"] = 1
        cfg.put(entry)
        config.save(self.dir, cfg)
        loaded = config.load(self.dir)
        self.assertEqual(loaded.meshes, [entry])
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        path = os.path.join(self.dir, "config.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        document = json.load(open(path))
        self.assertEqual(document["version"], 1)
        self.assertEqual(set(document["meshes"][0]) >= {
            "meshId", "memberId", "slug", "name", "pubkey", "secretKey", "brokerUrl",
            "joinedAt", "meshKey", "role", "displayName"}, True)

    def write(self, text):
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            f.write(text)

    def assertRefused(self, text, fragment):
        self.write(text)
        e = self.assertRaises(config.ConfigError, config.load, self.dir)
        self.assertIn(fragment, str(e))
        self.assertEqual(open(os.path.join(self.dir, "config.json")).read(), text)

    def test_corrupt_json(self):
        """Broken JSON is a ConfigError naming the file; the file is untouched."""
        self.assertRefused("{nope", "not valid JSON")

    def test_foreign_document(self):
        """A JSON document without 'meshes' is not ours."""
        self.assertRefused('{"hello": 1}', "not a claudemesh config")

    def test_other_version(self):
        """Another version is refused, not rewritten."""
        self.assertRefused('{"version": 2, "meshes": []}', "version 2")

    def test_key_mismatch(self):
        """A secretKey that does not match its pubkey is refused."""
        entry = make_entry().to_json()
        entry["pubkey"] = crypto.Identity.generate().pubkey
        self.assertRefused(json.dumps({"version": 1, "meshes": [entry]}), "does not match")

    def test_select(self):
        """One mesh is implied; several need --mesh; an unknown slug is an error."""
        cfg = config.Config()
        self.assertRaises(config.ConfigError, cfg.select)
        cfg.put(make_entry("a"))
        self.assertEqual(cfg.select().slug, "a")
        cfg.put(make_entry("b"))
        self.assertIn("--mesh", str(self.assertRaises(config.ConfigError, cfg.select)))
        self.assertEqual(cfg.select("b").slug, "b")
        self.assertRaises(config.ConfigError, cfg.select, "c")

    def test_session_key_persisted(self):
        """A session key is made once per (mesh, session id) and read back, 0600."""
        first = config.session_key(self.dir, "team", "sess-1")
        again = config.session_key(self.dir, "team", "sess-1")
        other = config.session_key(self.dir, "team", "sess-2")
        self.assertEqual(first.pubkey, again.pubkey)
        self.assertNotEqual(first.pubkey, other.pubkey)
        path = os.path.join(self.dir, "sessions", "team", "sess-1.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_session_id_cannot_escape(self):
        """A session id with a path separator is refused."""
        self.assertRaises(config.ConfigError, config.session_key, self.dir, "team", "../x")


class InviteTests(SynchronousTestCase):
    """
    Invite links: made, parsed, verified, and refused when altered or late.
    """

    def setUp(self):
        self.inviter = crypto.Identity.generate()
        self.key = crypto.new_mesh_key()
        self.invite = messages.make_invite(self.inviter, "m1", "Team", "inv1", "member",
                                           2_000_000_000, "ws://h:1/ws")

    def test_round_trip(self):
        """A link parses back to the same invite and mesh key."""
        link = messages.invite_link(self.invite, self.key)
        self.assertTrue(link.startswith("claudemesh://join/"))
        parsed = messages.parse_invite_link(link, now_seconds=1_900_000_000)
        self.assertEqual((parsed.invite, parsed.mesh_key), (self.invite, self.key))

    def test_tampered(self):
        """Changing the role breaks the signature."""
        forged = dict(self.invite, role="admin")
        link = messages.invite_link(forged, self.key)
        e = self.assertRaises(messages.InviteError, messages.parse_invite_link, link)
        self.assertIn("signature", str(e))

    def test_expired(self):
        """An invite past its expiry is refused locally."""
        link = messages.invite_link(self.invite, self.key)
        self.assertRaises(messages.InviteError, messages.parse_invite_link, link,
                          now_seconds=2_000_000_001)

    def test_garbage(self):
        """Other URLs and undecodable tokens are refused with a reason."""
        for link in ("https://example.com/x", "claudemesh://join/!!!", "claudemesh://join/abc"):
            self.assertRaises(messages.InviteError, messages.parse_invite_link, link)

    def test_join_request_signed(self):
        """The join body carries a proof the broker can verify."""
        joiner = crypto.Identity.generate()
        token = messages.invite_token(self.invite)
        body = messages.join_request(token, joiner, "bob", 123)
        self.assertTrue(crypto.verify(joiner.pubkey,
                                      crypto.join_string("inv1", joiner.pubkey, "bob", 123),
                                      body["signature"]))

    def test_http_base(self):
        """ws→http and wss→https, without the path."""
        self.assertEqual(messages.http_base("ws://h:7900/ws"), "http://h:7900")
        self.assertEqual(messages.http_base("wss://h/ws"), "https://h")
        self.assertRaises(ValueError, messages.http_base, "http://h/ws")


class TargetTests(SynchronousTestCase):
    """
    Turning names and prefixes into target keys.
    """

    def setUp(self):
        self.alice = "a" * 8 + "1" * 56
        self.alex = "a" * 8 + "2" * 56
        self.bob = "b" * 64
        self.bob_session = "c" * 64
        self.members = [{"name": "alice", "memberPubkey": self.alice},
                        {"name": "Alex", "memberPubkey": self.alex},
                        {"name": "bob", "memberPubkey": self.bob}]
        self.peers = [{"displayName": "bob", "pubkey": self.bob_session,
                       "memberPubkey": self.bob}]

    def resolve(self, spec):
        return messages.resolve_target(spec, self.members, self.peers)

    def test_passthrough(self):
        """'*', '@group' and full keys are used as given."""
        for spec in ("*", "@all", "@dev/x", self.bob):
            self.assertEqual(self.resolve(spec), spec)

    def test_name_case_insensitive(self):
        """A display name resolves to the member key, case-insensitively."""
        self.assertEqual(self.resolve("ALICE"), self.alice)
        self.assertEqual(self.resolve("bob"), self.bob)

    def test_prefix(self):
        """An 8+ hex prefix of a member key resolves; one of a session key picks that session."""
        self.assertEqual(self.resolve("bbbbbbbb"), self.bob)
        self.assertEqual(self.resolve("cccccccc"), self.bob_session)

    def test_ambiguous_prefix(self):
        """A prefix matching two members lists both."""
        e = self.assertRaises(messages.TargetError, self.resolve, "aaaaaaaa")
        self.assertEqual(e.code, "ambiguous")
        self.assertEqual({c["name"] for c in e.candidates}, {"alice", "Alex"})

    def test_not_found(self):
        """Unknown names and short prefixes are not found."""
        for spec in ("carol", "bbbb"):
            self.assertEqual(self.assertRaises(messages.TargetError, self.resolve, spec).code,
                             "not_found")


    def test_not_found_suggests_names(self):
        """
        A name no member has, but which starts or nearly spells members'
        names, is not found with a "did you mean"; one like no name, without.
        """
        e = self.assertRaises(messages.TargetError, self.resolve, "bo")
        self.assertEqual(e.message, 'No member matches "bo". Did you mean bob?')
        e = self.assertRaises(messages.TargetError, self.resolve, "alcie")
        self.assertEqual(e.message, 'No member matches "alcie". Did you mean alice or Alex?')
        e = self.assertRaises(messages.TargetError, self.resolve, "al")
        self.assertEqual(e.message, 'No member matches "al". Did you mean Alex or alice?')
        e = self.assertRaises(messages.TargetError, self.resolve, "zed")
        self.assertEqual(e.message, 'No member matches "zed".')


class OpenPushTests(SynchronousTestCase):
    """
    Opening a push with the secret its targetSpec names.
    """

    def setUp(self):
        self.sender = crypto.Identity.generate()
        self.member = crypto.Identity.generate()
        self.session = crypto.Identity.generate()
        self.mesh_key = crypto.new_mesh_key()

    def push(self, target, nonce, ciphertext):
        return {"type": "push", "messageId": "x", "senderPubkey": self.sender.pubkey,
                "senderMemberPubkey": self.sender.pubkey, "targetSpec": target,
                "nonce": nonce, "ciphertext": ciphertext, "priority": "next",
                "createdAt": "t", "seq": 1}

    def test_each_secret(self):
        """Member key, session key and mesh key each open their messages."""
        cases = [(self.member.pubkey, crypto.encrypt_direct(self.sender, self.member.pubkey,
                                                             b"m")),
                 (self.session.pubkey, crypto.encrypt_direct(self.sender, self.session.pubkey,
                                                              b"s")),
                 ("@dev", crypto.encrypt_broadcast(self.mesh_key, b"b"))]
        texts = [messages.open_push(self.push(t, *sealed), self.member, self.session,
                                    self.mesh_key).text for t, sealed in cases]
        self.assertEqual(texts, ["m", "s", "b"])

    def test_failure_reported_on_message(self):
        """A message that does not open has an error and no text."""
        nonce, ciphertext = crypto.encrypt_broadcast(crypto.new_mesh_key(), b"x")
        inbound = messages.open_push(self.push("*", nonce, ciphertext), self.member, None,
                                     self.mesh_key)
        self.assertIsNone(inbound.text)
        self.assertIn("cannot decrypt", inbound.error)


class DecisionTests(SynchronousTestCase):
    """
    Backoff and what each close code means (docs/protocol.md, close codes).
    """

    def test_backoff_caps(self):
        """Full jitter under caps 1, 2, 4, 8, 16, then 30 s."""
        almost = lambda: 0.999999  # noqa: E731
        caps = [round(connection.backoff_delay(n, almost)) for n in range(8)]
        self.assertEqual(caps, [1, 2, 4, 8, 16, 30, 30, 30])
        self.assertEqual(connection.backoff_delay(3, lambda: 0.0), 0.0)

    def test_close_actions(self):
        """Each row of the close-code table."""
        table = [
            (1000, "disconnected", connection.RECONNECT),
            (1000, "disconnected_stale", connection.RECONNECT),
            (1000, "session_replaced", connection.STOP),
            (4001, "kicked", connection.TERMINAL),
            (4001, "kicked_stale", connection.TERMINAL),
            (4002, "banned", connection.TERMINAL),
            (4003, "slow_consumer", connection.RECONNECT),
            (1001, "shutting down", connection.RECONNECT),
            (1006, "", connection.RECONNECT),
            (1011, "", connection.RECONNECT),
            (1008, "unauthorized", connection.TERMINAL),
            (1008, "bad_signature", connection.TERMINAL),
            (1008, "bad_session_pubkey", connection.TERMINAL),
            (1008, "malformed", connection.TERMINAL),
            (1008, "capacity", connection.RECONNECT),
            (1008, "timestamp_skew", connection.RECONNECT),
            (1008, "flood", connection.RECONNECT),
            (1009, "", connection.RECONNECT),
        ]
        for code, reason, action in table:
            self.assertEqual(connection.close_action(code, reason), action, (code, reason))

    def test_terminal_messages(self):
        """4001 has the fixed text; 4002 keeps the broker's message or builds it."""
        self.assertEqual(connection.terminal_message(4001, "kicked", "Team"),
                         "Kicked from this mesh. Run claudemesh to rejoin.")
        self.assertEqual(connection.terminal_message(4002, "banned", "Team", revoked="said"),
                         "said")
        self.assertEqual(connection.terminal_message(4002, "banned", "Team"),
                         'You\'ve been removed from "Team". Contact the mesh owner to rejoin.')


class _FakeEndpoint:
    def __init__(self, owner):
        self.owner = owner

    def connect(self, factory):
        d = defer.Deferred()
        self.owner.attempts.append((factory, d))
        return d


class _FakeProto:
    def __init__(self):
        self.sent = []
        self.closed = []
        self.dropped = False

    def send_frame(self, frame):
        self.sent.append(frame)

    def sendClose(self, code=None):
        self.closed.append(code)

    def dropConnection(self, abort=False):
        self.dropped = True


class StateMachineTests(SynchronousTestCase):
    """
    L{MeshClient} on a L{task.Clock} with a fake endpoint and connection.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.attempts = []
        self.entry = make_entry()
        self.client = connection.MeshClient(
            self.clock, self.entry, "cli-1", receive=False, display_name="alice",
            random=lambda: 0.5, endpoint_factory=lambda r, u, t: _FakeEndpoint(self),
            max_queue=2)

    def open(self):
        factory, d = self.attempts[-1]
        proto = _FakeProto()
        d.callback(proto)
        self.client._opened(proto)
        return proto

    def ack(self, proto):
        self.client._received(proto, json.dumps({"type": "hello_ack", "role": "member",
                                                 "_reqId": "hello"}).encode())

    def test_hello_is_signed(self):
        """The hello signs the tagged form with its session id; display name, receive:false."""
        self.client.start()
        proto = self.open()
        hello = proto.sent[0]
        self.assertEqual((hello["type"], hello["displayName"], hello["receive"]),
                         ("hello", "alice", False))
        signed = crypto.hello_string("m1", "u1", self.entry.pubkey, hello["timestamp"],
                                     hello["sessionId"])
        self.assertTrue(crypto.verify(self.entry.pubkey, signed, hello["signature"]))

    def test_hello_timeout_reconnects(self):
        """No hello_ack within 5 s drops the connection; a close then schedules a retry."""
        self.client.start()
        proto = self.open()
        self.clock.advance(5)
        self.assertTrue(proto.dropped)
        self.client._closed(proto, False, 1006, None)
        self.assertEqual(len(self.attempts), 1)
        self.clock.advance(0.5)  # half of the first cap
        self.assertEqual(len(self.attempts), 2)

    def test_bounded_queue(self):
        """While disconnected at most max_queue frames wait; the next one fails."""
        self.client.fire({"type": "set_status", "status": "idle"})
        self.client.request({"type": "list_peers"})
        failed = self.client.request({"type": "list_peers"})
        self.failureResultOf(failed, connection.QueueFull)

    def test_queue_flushed_after_hello(self):
        """Queued frames go out after the hello_ack, in order."""
        d = self.client.request({"type": "list_peers"})
        self.client.start()
        proto = self.open()
        self.assertEqual(len(proto.sent), 1)
        self.ack(proto)
        self.assertEqual(proto.sent[1]["type"], "list_peers")
        req_id = proto.sent[1]["_reqId"]
        self.client._received(proto, json.dumps({"type": "peers_list", "peers": [],
                                                 "_reqId": req_id}).encode())
        self.assertEqual(self.successResultOf(d)["type"], "peers_list")

    def test_request_on_a_closing_connection_waits(self):
        """
        A request written while the connection is closing (Autobahn refuses
        to send, onClose not run yet) fails nothing at once: it is written
        again once the next connection's hello is acked.
        """
        from autobahn.exception import Disconnected

        self.client.start()
        proto = self.open()
        self.ack(proto)

        def closing(frame):
            # What Autobahn's sendMessage raises then.
            raise Disconnected("Attempt to send on a closed protocol")

        proto.send_frame = closing
        d = self.client.request({"type": "list_members"})
        self.client.fire({"type": "set_status", "status": "idle"})
        self.assertNoResult(d)
        self.client._closed(proto, False, 1006, None)
        self.assertNoResult(d)
        self.clock.advance(1)
        again = self.open()
        self.ack(again)
        self.assertEqual([f["type"] for f in again.sent[1:]], ["list_members", "set_status"])

    def test_frame_nested_too_deep_is_dropped(self):
        """
        A frame from the broker nested deeper than the JSON parser recurses
        is dropped with a warning, like any frame that is not JSON; the
        connection goes on.
        """
        self.client.start()
        proto = self.open()
        self.ack(proto)
        d = self.client.request({"type": "list_peers"})
        self.client._received(proto, b"[" * 100000)
        self.client._received(proto, json.dumps({"type": "peers_list", "peers": [],
                                                 "_reqId": proto.sent[-1]["_reqId"]}).encode())
        self.assertEqual(self.successResultOf(d)["type"], "peers_list")

    def test_send_kept_across_reconnect(self):
        """A send unanswered when the connection drops is written again with the same id."""
        self.client.start()
        proto = self.open()
        self.ack(proto)
        d = self.client.send("*", "bm9uY2U=", "Y2lwaGVy", send_id="same")
        self.client._closed(proto, False, 1006, None)
        self.clock.advance(1)
        second = self.open()
        self.ack(second)
        sends = [f for f in second.sent if f["type"] == "send"]
        self.assertEqual([f["id"] for f in sends], ["same"])
        self.client._received(second, json.dumps({"type": "ack", "id": "same", "messageId": "m",
                                                  "queued": True}).encode())
        self.assertTrue(self.successResultOf(d)["queued"])

    def test_revoked_message_kept(self):
        """error revoked then close 4002: the broker's message wins over the reason."""
        self.client.start()
        proto = self.open()
        self.ack(proto)
        self.client._received(proto, json.dumps({
            "type": "error", "code": "revoked", "message": "removed, custom"}).encode())
        self.client._closed(proto, True, 4002, "banned")
        failure = self.failureResultOf(self.client.when_done(), connection.TerminalClose)
        self.assertEqual(failure.value.message, "removed, custom")
        self.clock.advance(60)
        self.assertEqual(len(self.attempts), 1)

    def test_session_replaced_stops(self):
        """1000 session_replaced stops without a retry."""
        self.client.start()
        proto = self.open()
        self.ack(proto)
        self.client._closed(proto, True, 1000, "session_replaced")
        self.failureResultOf(self.client.when_done(), connection.SessionReplaced)
        self.clock.advance(60)
        self.assertEqual(len(self.attempts), 1)

    def test_max_attempts(self):
        """Refused connections end in Unreachable after max_attempts."""
        self.client.max_attempts = 2
        d = self.client.start()
        self.attempts[-1][1].errback(ConnectionRefusedError("refused"))
        self.clock.advance(1)
        self.attempts[-1][1].errback(ConnectionRefusedError("refused"))
        self.failureResultOf(d, connection.Unreachable)

    def test_duplicate_push_acked_not_handed(self):
        """A push seen before is acknowledged again but not handed to the app twice."""
        handed = []
        self.client.on_message = handed.append
        self.client.start()
        proto = self.open()
        self.ack(proto)
        sealed = crypto.encrypt_broadcast(self.entry.mesh_key, b"hi")
        push = json.dumps({"type": "push", "messageId": "m1", "targetSpec": "*",
                           "senderPubkey": "x", "nonce": sealed[0],
                           "ciphertext": sealed[1]}).encode()
        self.client._received(proto, push)
        self.client._received(proto, push)
        self.assertEqual([m.text for m in handed], ["hi"])
        acks = [f for f in proto.sent if f["type"] == "client_ack"]
        self.assertEqual([a["messageId"] for a in acks], ["m1", "m1"])
