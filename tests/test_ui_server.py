"""
Unit tests of C{claudemesh ui}'s server and mesh view without the global
reactor: the gate (token, Host, Origin, Sec-Fetch-Site) on the page, the
API and the live handshake; what the API returns (escaped JSON, headers);
bad bodies; and L{MeshWatch} over a fake client on a L{task.Clock}.
"""

import json

from autobahn.websocket.types import ConnectionDeny
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from claudemesh import crypto
from claudemesh.client import config, connection, history, keyring, meshkeys
from claudemesh.webui import server, watch
from tests.test_client_units import make_entry

PORT = 7777
BASE = "http://127.0.0.1:%d" % (PORT,)
ORIGIN = {"Origin": BASE}
HOSTILE = "<img src=x onerror=alert(1)>"
TOKEN = "t0ken-for-the-tests_0123456789abcdefghijklmnopq"


class FakeClient:
    """
    What L{MeshWatch} uses of a L{MeshClient}, answering from C{replies}.
    """

    def __init__(self, reactor, entry, session_id, session_identity=None, **kwargs):
        self.mesh = entry
        self.identity = entry.identity
        self.session_id = session_id
        self.session_identity = session_identity or crypto.Identity.generate()
        self.kwargs = kwargs
        self.connected = False
        self.hello_ack = None
        self.requests = []
        self.sent = []
        self.stopped = False
        self.replies = {}
        self._done = defer.Deferred()
        self.mesh_keys = meshkeys.EpochKeys(self, keyring.KeyRing.of_entry(entry))

    @property
    def pubkey(self):
        return self.session_identity.pubkey

    def start(self):
        return defer.succeed(None)

    def when_done(self):
        return self._done

    def stop(self):
        self.stopped = True
        self.connected = False
        return defer.succeed(None)

    def connect(self, watch_ack=True, role="owner"):
        self.connected = True
        self.hello_ack = {"type": "hello_ack", "role": role, "memberDisplayName": "owner",
                          "serverTime": 1}
        if watch_ack:
            self.hello_ack["watch"] = True
        self.kwargs["on_connect"](self.hello_ack)

    def request(self, frame, timeout=None):
        self.requests.append(frame)
        reply = self.replies.get(frame["type"])
        if isinstance(reply, Exception):
            return defer.fail(reply)
        if callable(reply):
            return defer.succeed(reply(frame))
        return defer.succeed(dict(reply or {}))

    def send_text(self, target, text, priority="next", timeout=None):
        self.sent.append((target, text, priority))
        return defer.succeed({"type": "ack", "id": "x", "messageId": "msg-%d" % len(self.sent),
                              "queued": True})


def bob_rows(bob_key, name="bob"):
    members = {"members": [{"name": name, "memberPubkey": bob_key, "role": "member",
                            "online": True}]}
    peers = {"peers": [{"pubkey": bob_key, "memberPubkey": bob_key, "displayName": name,
                        "role": "member", "status": "working", "statusSource": "hook",
                        "statusUpdatedAt": "2027-01-15T08:00:00.000Z",
                        "summary": "<script>x</script>", "groups": [], "sessionId": "b1",
                        "connectedAt": "2027-01-15T08:00:00.000Z", "cwd": "/w",
                        "online": True}]}
    return members, peers


class UITestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.entry = make_entry(role="owner")
        self.cfg = config.Config([self.entry])
        self.bob = crypto.Identity.generate()
        self.clients = []
        self.history = history.History(self.mktemp(), "ui", clock=self.clock.seconds)

        def factory(*args, **kwargs):
            client = FakeClient(*args, **kwargs)
            members, peers = bob_rows(self.bob.pubkey, HOSTILE)
            client.replies.update({"list_members": members, "list_peers": peers})
            self.clients.append(client)
            return client

        def make_watch(entry):
            view = watch.MeshWatch(self.clock, entry, "ui-test", history=self.history,
                                   history_reader=self.history, client_factory=factory)
            view.start()
            return view

        self.gate = server.Gate(TOKEN, PORT)
        self.ui = server.UIServer(self.clock, self.cfg, self.gate, make_watch)
        self.http = StubTreq(self.ui.resource())

    def tearDown(self):
        for view in self.ui.watches.values():
            view.stop()

    def get(self, path, headers=None, token=True):
        headers = dict(headers or {})
        if token is True:
            headers.setdefault("Authorization", "Bearer " + TOKEN)
        return self.successResultOf(self.http.get(BASE + path, headers=headers))

    def post(self, path, body, headers=None, content_type="application/json"):
        headers = dict(ORIGIN, **(headers or {}))
        headers.setdefault("Authorization", "Bearer " + TOKEN)
        if content_type:
            headers["Content-Type"] = content_type
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        return self.successResultOf(self.http.post(BASE + path, data=data, headers=headers))

    def body(self, response):
        return self.successResultOf(response.content())

    def json(self, response):
        return json.loads(self.body(response))

    def connected(self):
        """
        The watcher of the mesh, connected.
        """
        view = self.ui.watch_for()
        view.client.connect()
        self.clock.advance(0)
        return view


class GateTests(UITestCase):
    def assertRefused(self, response):
        self.assertEqual(response.code, 403)
        self.assertEqual(self.body(response), b"Forbidden\n")
        self.assertIsNone(response.headers.getRawHeaders("Access-Control-Allow-Origin"))

    def test_page_needs_the_token(self):
        """Without the token, or with a wrong one, the page is a bare 403."""
        self.assertRefused(self.get("/", token=False))
        self.assertRefused(self.get("/?token=nope", token=False))
        self.assertRefused(self.get("/?token=" + TOKEN[:-1], token=False))

    def test_page_with_the_token(self):
        """With the token: the page, its assets carrying it, a strict CSP, no cookie."""
        response = self.get("/?token=" + TOKEN, token=False)
        self.assertEqual(response.code, 200)
        page = self.body(response).decode("utf-8")
        self.assertIn('src="/static/app.js?token=%s"' % (TOKEN,), page)
        csp = response.headers.getRawHeaders("Content-Security-Policy")[0]
        self.assertIn("default-src 'none'", csp)
        self.assertIn("script-src 'self'", csp)
        self.assertIn("connect-src 'self' ws://127.0.0.1:%d" % (PORT,), csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertNotIn("unsafe", csp)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("X-Content-Type-Options"), ["nosniff"])
        self.assertEqual(headers.getRawHeaders("Referrer-Policy"), ["no-referrer"])
        self.assertIsNone(headers.getRawHeaders("Set-Cookie"))
        self.assertIsNone(headers.getRawHeaders("Access-Control-Allow-Origin"))

    def test_assets_need_the_token(self):
        """The script and style sheet are served with the token only."""
        self.assertRefused(self.get("/static/app.js", token=False))
        response = self.get("/static/app.js?token=" + TOKEN, token=False)
        self.assertEqual(response.code, 200)
        self.assertIn(b"textContent", self.body(response))
        self.assertNotIn(b"innerHTML =", self.body(response))
        self.assertEqual(self.get("/static/nope.js").code, 404)
        self.assertRefused(self.get("/static/../server.py", token=False))

    def test_other_host_refused(self):
        """A request naming another host (DNS rebinding) is refused even with the token."""
        self.assertRefused(self.get("/api/meshes", {"Host": "evil.example:%d" % (PORT,)}))
        self.assertRefused(self.get("/api/meshes", {"Host": "127.0.0.1:1"}))

    def test_foreign_origin_refused(self):
        """Another origin, even on 127.0.0.1, or a cross-site fetch, is refused."""
        self.assertRefused(self.get("/api/meshes", {"Origin": "http://127.0.0.1:8888"}))
        self.assertRefused(self.get("/api/meshes", {"Origin": "null"}))
        self.assertRefused(self.get("/api/meshes", {"Sec-Fetch-Site": "cross-site"}))
        self.assertRefused(self.get("/api/meshes", {"Sec-Fetch-Site": "same-site"}))
        self.assertEqual(self.get("/api/meshes", {"Sec-Fetch-Site": "same-origin"}).code, 200)

    def test_api_needs_the_token(self):
        """The API refuses a missing or wrong bearer token."""
        self.assertRefused(self.get("/api/state", token=False))
        self.assertRefused(self.get("/api/state", {"Authorization": "Bearer wrong"}))
        self.assertRefused(self.get("/api/state", {"Authorization": "Basic " + TOKEN}))

    def test_post_needs_this_origin(self):
        """An action without an Origin (or with another) is refused; nothing is sent."""
        self.connected()
        for headers in ({"Origin": "http://localhost:9"}, {}):
            response = self.successResultOf(self.http.post(
                BASE + "/api/send", data=json.dumps({"to": "*", "text": "x"}).encode(),
                headers=dict(headers, Authorization="Bearer " + TOKEN,
                             **{"Content-Type": "application/json"})))
            self.assertRefused(response)
        self.assertEqual(self.clients[0].sent, [])

    def test_preflight_refused(self):
        """A CORS preflight gets a 403 and no CORS header."""
        response = self.successResultOf(self.http.request(
            "OPTIONS", BASE + "/api/send", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}))
        self.assertRefused(response)

    def test_unknown_paths(self):
        """Unknown paths are 403 without the token and 404 with it."""
        self.assertRefused(self.get("/admin", token=False))
        self.assertEqual(self.get("/admin").code, 404)
        self.assertEqual(self.get("/api/nothing").code, 404)

    def test_live_handshake_gate(self):
        """The live endpoint refuses a request without this origin before any upgrade."""
        self.assertRefused(self.get("/live?token=" + TOKEN, token=False))
        self.assertRefused(self.get("/live", {"Origin": BASE}, token=False))

    def test_live_on_connect(self):
        """The WebSocket handshake is checked again: token, origin and mesh."""
        protocol = server.LiveProtocol()
        protocol.factory = type("F", (), {"ui": self.ui})()

        class Request:
            def __init__(self, headers, params):
                self.headers, self.params = headers, params

        good = {"host": "127.0.0.1:%d" % (PORT,), "origin": BASE}
        self.assertIsNone(protocol.onConnect(Request(good, {"token": [TOKEN]})))
        for headers, params in ((good, {}), (good, {"token": ["bad"]}),
                                (dict(good, origin="http://evil.example"), {"token": [TOKEN]}),
                                ({"host": good["host"]}, {"token": [TOKEN]})):
            e = self.assertRaises(ConnectionDeny, protocol.onConnect, Request(headers, params))
            self.assertEqual(e.code, 403)
        e = self.assertRaises(ConnectionDeny, protocol.onConnect,
                              Request(good, {"token": [TOKEN], "mesh": ["other"]}))
        self.assertEqual(e.code, 404)


class ClockTimer:
    """
    What Autobahn's factory uses of its batched timer, on a L{task.Clock}.
    """

    def __init__(self, clock):
        self.clock = clock

    def call_later(self, delay, function, *args, **kwargs):
        return self.clock.callLater(delay, function, *args, **kwargs)


class LiveTests(UITestCase):
    def test_large_snapshot_reaches_the_page(self):
        """
        A snapshot bigger than the page may send in one message (a mesh with
        many members) still goes out: the live limit holds what the page
        sends, not what the server sends it.
        """
        view = self.connected()
        members = [{"name": "member-%03d" % (i,), "memberPubkey": "%064x" % (i,),
                    "role": "member", "online": False} for i in range(100)]
        view.client.replies["list_members"] = {"members": members}
        view.refresh()
        self.assertGreater(len(server.encode_json(view.snapshot())), server.MAX_LIVE_MESSAGE)
        factory = server.LiveResource(self.ui)._websocket._factory
        # Autobahn's timers (handshake timeout, pings) on the test's clock,
        # not the global reactor.
        factory._batched_timer = ClockTimer(self.clock)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"GET /live?token=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: %s\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (TOKEN.encode(), PORT, BASE.encode()))
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer[:200])
        self.assertIn(b'"member-099"', answer)
        protocol.connectionLost(Failure(ConnectionDone()))


class APITests(UITestCase):
    def test_state_escapes_peer_strings(self):
        """What peers wrote comes back as JSON in which < > & never appear raw."""
        self.connected()
        response = self.get("/api/state")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"),
                         ["application/json; charset=utf-8"])
        raw = self.body(response)
        self.assertNotIn(b"<", raw)
        self.assertNotIn(b">", raw)
        self.assertIn(b"\\u003cimg src=x onerror=alert(1)\\u003e", raw)
        state = json.loads(raw)
        [session] = state["presence"]["sessions"]
        self.assertEqual((session["displayName"], session["summary"], session["statusSource"]),
                         (HOSTILE, "<script>x</script>", "hook"))
        self.assertEqual(state["presence"]["members"][0]["name"], HOSTILE)

    def test_encode_json(self):
        """The JSON encoder escapes what could end a script or a line."""
        raw = server.encode_json({"a": "</script>&\u2028"})
        self.assertEqual(raw, b'{"a":"\\u003c/script\\u003e\\u0026\\u2028"}')
        self.assertEqual(json.loads(raw), {"a": "</script>&\u2028"})

    def test_meshes(self):
        """The joined meshes are listed, with the default one."""
        document = self.json(self.get("/api/meshes"))
        self.assertEqual(document["default"], "team")
        self.assertEqual([m["slug"] for m in document["meshes"]], ["team"])

    def test_send_by_name(self):
        """A send resolves a display name to the member key and records the message."""
        view = self.connected()
        response = self.post("/api/send", {"to": HOSTILE, "text": "hi <b>", "priority": "now"})
        self.assertEqual(response.code, 200, self.body(response))
        self.assertEqual(self.json(response)["targetSpec"], self.bob.pubkey)
        self.assertEqual(self.clients[0].sent, [(self.bob.pubkey, "hi <b>", "now")])
        [message] = view.messages.values()
        self.assertEqual((message["conversation"], message["delivery"], message["text"]),
                         (self.bob.pubkey, "queued", "hi <b>"))

    def test_send_to_nobody(self):
        """An unknown name is a 404 with the reason; nothing is sent."""
        self.connected()
        response = self.post("/api/send", {"to": "nobody", "text": "x"})
        self.assertEqual(response.code, 404)
        self.assertEqual(self.json(response)["error"], "not_found")
        self.assertEqual(self.clients[0].sent, [])

    def test_bad_bodies(self):
        """Wrong content type, oversized, malformed or ill-typed bodies get clear errors."""
        self.connected()
        self.assertEqual(self.post("/api/send", {"to": "*", "text": "x"},
                                   content_type="text/plain").code, 415)
        self.assertEqual(self.post("/api/send", b"x" * (server.MAX_BODY + 10)).code, 413)
        # The last: nested deeper than the JSON parser recurses.
        for body in (b"{nope", b"[1]", b"\xff\xfe", b"[" * 100000):
            self.assertEqual(self.post("/api/send", body).code, 400)
        for body in ({"to": "*"}, {"to": 5, "text": "x"}, {"to": "*", "text": "a\x00b"},
                     {"to": "*", "text": "x", "priority": "urgent"}, {"mesh": 7},
                     {"to": "*", "text": "x", "mesh": "other"}):
            response = self.post("/api/send", body)
            self.assertEqual(response.code, 400, body)
            self.assertEqual(self.json(response)["error"], "malformed")
        self.assertEqual(self.clients[0].sent, [])

    def test_moderation_passes_the_broker_refusal(self):
        """A broker refusal of a moderation comes back as 409 with its code and message."""
        self.connected()
        self.clients[0].replies["kick"] = connection.RequestError(
            "forbidden", "only owner or admin can kick")
        response = self.post("/api/moderate", {"action": "kick", "target": "bob"})
        self.assertEqual(response.code, 409)
        self.assertEqual(self.json(response), {"error": "forbidden",
                                               "message": "only owner or admin can kick"})
        response = self.post("/api/moderate", {"action": "explode", "target": "bob"})
        self.assertEqual(response.code, 400)

    def test_moderation_frames(self):
        """Each moderation sends its frame; set_role carries the role."""
        self.connected()
        client = self.clients[0]
        client.replies.update({"kick": {"kicked": ["bob"]}, "set_role": {"target": "bob",
                                                                         "role": "admin"}})
        self.assertEqual(self.json(self.post("/api/moderate", {
            "action": "kick", "target": self.bob.pubkey})), {"kicked": ["bob"]})
        self.post("/api/moderate", {"action": "set_role", "target": "bob", "role": "admin"})
        frames = [f for f in client.requests if f["type"] in ("kick", "set_role")]
        self.assertEqual(frames, [{"type": "kick", "target": self.bob.pubkey},
                                  {"type": "set_role", "target": "bob", "role": "admin"}])

    def test_invite_link_and_qr(self):
        """An invite comes back as a signed link with the mesh key and an SVG QR code."""
        self.connected()
        self.clients[0].replies["create_invite"] = {"inviteId": "inv1",
                                                    "expiresAt": 1_900_000_000}
        document = self.json(self.post("/api/invite", {"role": "member", "uses": 2}))
        self.assertTrue(document["link"].startswith("claudemesh://join/"))
        self.assertTrue(document["qr"].startswith("data:image/svg+xml"))
        from claudemesh.client import messages

        parsed = messages.parse_invite_link(document["link"])
        self.assertEqual((parsed.invite["inviteId"], parsed.mesh_key),
                         ("inv1", self.entry.mesh_key))
        self.assertEqual(self.post("/api/invite", {"uses": 0}).code, 400)

    def test_invite_after_rotation_carries_the_current_key(self):
        """After a rotation the page's invite holds the current epoch's key and its epoch."""
        self.connected()
        keys = self.clients[0].mesh_keys
        rotated = crypto.new_mesh_key()
        keys.ring.put(2, rotated)
        keys.current = 2
        self.clients[0].replies["create_invite"] = {"inviteId": "inv2",
                                                    "expiresAt": 1_900_000_000}
        document = self.json(self.post("/api/invite", {"role": "member"}))
        from claudemesh.client import messages

        parsed = messages.parse_invite_link(document["link"])
        self.assertEqual((parsed.mesh_key, parsed.mesh_key_epoch), (rotated, 2))
        keys.current = 3
        refused = self.post("/api/invite", {"role": "member"})
        self.assertEqual(refused.code, 409)
        self.assertIn("does not hold the mesh key of the current epoch 3",
                      self.json(refused)["message"])

    def test_audit_with_verification(self):
        """The audit answer carries the entries and the chain check."""
        self.connected()
        self.clients[0].replies.update({
            "audit_query": {"entries": [{"seq": 1, "eventType": "mesh_created"}], "total": 1},
            "audit_verify": {"valid": True, "entries": 1}})
        document = self.json(self.get("/api/audit?limit=5"))
        self.assertEqual((document["valid"], document["checked"], len(document["entries"])),
                         (True, 1, 1))
        self.assertEqual(self.get("/api/audit?limit=9999").code, 400)


class MeshWatchTests(UITestCase):
    def test_hello_says_watch(self):
        """The watcher's hello asks for watch, with a session key."""
        view = self.ui.watch_for()
        self.assertEqual(view.client.kwargs["hello_extra"]["watch"], True)
        self.assertIsNotNone(view.client.session_identity)

    def test_old_broker_left_at_once(self):
        """A hello_ack without watch:true (an older broker) stops the watcher, saying why."""
        view = self.ui.watch_for()
        view.client.connect(watch_ack=False)
        self.assertTrue(view.client.stopped)
        self.assertEqual(view.state, "ended")
        self.assertIn("does not know watching sessions", view.presence()["problem"])

    def test_events_update_presence(self):
        """peer_status replaces a session's row; peer_left removes it; subscribers hear both."""
        view = self.connected()
        events = []
        view.subscribe(events.append)
        row = dict(bob_rows(self.bob.pubkey)[1]["peers"][0], status="dnd")
        view._event({"event": "peer_status", "eventData": row})
        self.assertEqual([s["status"] for s in view.presence()["sessions"]], ["dnd"])
        view._event({"event": "peer_left", "eventData": {"pubkey": self.bob.pubkey,
                                                         "sessionId": "b1"}})
        self.assertEqual(view.presence()["sessions"], [])
        self.assertEqual([e["type"] for e in events], ["presence", "presence"])

    def test_history_of_other_sessions_shown(self):
        """Records other local sessions wrote appear, once, in their conversations."""
        view = self.connected()
        other = history.History(self.history.directory[:-len("/history")], "mcp",
                                clock=self.clock.seconds)
        other.append(self.entry.meshId, {"kind": "received", "messageId": "m1",
                                         "senderPubkey": self.bob.pubkey,
                                         "senderMemberPubkey": self.bob.pubkey,
                                         "targetSpec": self.entry.pubkey, "text": "yo"})
        other.append(self.entry.meshId, {"kind": "sent", "messageId": "m2", "targetSpec": "*",
                                         "text": "all"})
        self.clock.advance(watch.HISTORY_POLL_SECONDS)
        self.clock.advance(watch.HISTORY_POLL_SECONDS)
        self.assertEqual([(m["conversation"], m["text"], m["via"])
                          for m in view.messages.values()],
                         [(self.bob.pubkey, "yo", "mcp"), ("*", "all", "mcp")])

    def test_delivery_state_follows(self):
        """Sent messages' delivery states are polled until final."""
        view = self.connected()
        view.add_records([{"kind": "sent", "messageId": "m9", "targetSpec": self.bob.pubkey,
                           "text": "x", "at": int(self.clock.seconds() * 1000)}])
        answers = iter(["queued", "delivered"])
        self.clients[0].replies["message_status"] = lambda frame: {
            "recipients": [{"name": "bob", "pubkey": self.bob.pubkey,
                            "status": next(answers)}]}
        self.clock.advance(watch.STATUS_POLL_SECONDS)
        self.assertEqual(view.messages["sent:m9"]["delivery"], "queued")
        self.clock.advance(watch.STATUS_POLL_SECONDS)
        self.assertEqual(view.messages["sent:m9"]["delivery"], "delivered")
        asked = len([f for f in self.clients[0].requests if f["type"] == "message_status"])
        self.clock.advance(watch.STATUS_POLL_SECONDS)
        self.assertEqual(len([f for f in self.clients[0].requests
                              if f["type"] == "message_status"]), asked)

    def test_conversation_of(self):
        """Broadcasts, groups and both directions of a DM land in the right conversation."""
        me, session, bob = "a" * 64, "b" * 64, "c" * 64
        bob_session = "d" * 64
        own = {me, session}
        owner = {bob_session: bob}
        cases = [({"kind": "sent", "targetSpec": "@all"}, "*"),
                 ({"kind": "received", "targetSpec": "@ops/db"}, "@ops/db"),
                 ({"kind": "sent", "targetSpec": bob_session}, bob),
                 ({"kind": "received", "targetSpec": session, "senderMemberPubkey": bob}, bob),
                 ({"kind": "received", "targetSpec": bob, "senderMemberPubkey": me}, bob)]
        for record, expected in cases:
            self.assertEqual(watch.conversation_of(record, own, owner), expected, record)

    def test_delivery_state_words(self):
        """Recipient states fold into one word."""
        def rows(*states):
            return [{"status": s} for s in states]

        self.assertEqual(watch.delivery_state(rows()), "queued")
        self.assertEqual(watch.delivery_state(rows("delivered", "delivered")), "delivered")
        self.assertEqual(watch.delivery_state(rows("delivered", "queued")), "partly delivered")
        self.assertEqual(watch.delivery_state(rows("expired")), "expired")
        self.assertEqual(watch.delivery_state(rows("expired", "delivered")), "delivered")
