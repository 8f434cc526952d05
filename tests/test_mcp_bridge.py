"""
The MCP server's Twisted side (L{claudemesh.mcpserver.bridge}) with fake
mesh clients and a fake clock: message modes, the channel notification's
content and meta, check_messages, terminal closes, target resolution and the
transcript status relay. No reactor, no network.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudemesh.client import connection, keyring, meshkeys, messages
from claudemesh.mcpserver import bridge
from tests.test_client_units import make_entry

ALICE_MEMBER = "a" * 64
ALICE_SESSION = "b" * 64
BOB_MEMBER = "c" * 64


class FakeClient:
    """
    Enough of L{connection.MeshClient} for the bridge.
    """

    def __init__(self, reactor, entry, session_id, **kw):
        self.mesh = entry
        self.session_id = session_id
        self.kw = kw
        self.display_name = kw.get("display_name")
        self.pubkey = "f" * 64
        self.connected = True
        self.hello_ack = {"statusTtlSeconds": 60, "role": "member",
                          "memberDisplayName": "me"}
        self.requests, self.sent, self.fired, self.checked = [], [], [], []
        self.members = [{"name": "alice", "memberPubkey": ALICE_MEMBER},
                        {"name": "bob", "memberPubkey": BOB_MEMBER}]
        self.peers = [{"displayName": "alice", "pubkey": ALICE_SESSION,
                       "memberPubkey": ALICE_MEMBER, "sessionId": "s-alice", "status": "idle",
                       "cwd": "/w", "summary": "tests", "groups": []},
                      {"displayName": "me", "pubkey": self.pubkey, "memberPubkey": "d" * 64,
                       "sessionId": session_id, "status": "working", "groups": []}]
        self.done = defer.Deferred()
        self.key_status = None
        self.mesh_keys = meshkeys.EpochKeys(self, keyring.KeyRing.of_entry(entry))

    def start(self):
        return defer.succeed(self.hello_ack)

    def when_done(self):
        return self.done

    def stop(self):
        return defer.succeed(None)

    def request(self, frame, timeout=None):
        self.requests.append(frame)
        kind = frame["type"]
        if kind == "list_members":
            return defer.succeed({"members": self.members})
        if kind == "list_peers":
            return defer.succeed({"peers": self.peers})
        if kind == "mesh_key_status" and self.key_status is not None:
            return defer.succeed(self.key_status)
        if kind == "message_status":
            return defer.succeed({"recipients": [{"name": "alice", "pubkey": ALICE_MEMBER,
                                                  "status": "delivered"}]})
        return defer.fail(connection.RequestError("unknown_type", kind))

    def send_text(self, target, text, priority="next", timeout=None):
        self.sent.append((target, text, priority))
        return defer.succeed({"queued": True, "messageId": "msg-%d" % (len(self.sent),)})

    def fire(self, frame):
        self.fired.append(frame)

    def fire_checked(self, frame, timeout=None):
        self.checked.append(frame)
        return defer.succeed(None)


def inbound(text="hi", target=ALICE_SESSION, priority="next", sender=ALICE_MEMBER,
            session=ALICE_SESSION, message_id="m-1"):
    return messages.Inbound(messageId=message_id, meshId="m1", senderPubkey=session,
                            senderMemberPubkey=sender, targetSpec=target, priority=priority,
                            createdAt="2026-11-28T10:00:00.000Z", seq=1, text=text)


class BridgeTests(SynchronousTestCase):
    """
    The tools and the incoming side over fake clients.
    """

    def make(self, entries=None, mode="push", **kw):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.notes = []
        entries = [make_entry("team")] if entries is None else entries
        b = bridge.Bridge(self.clock, entries, "sess-1",
                          lambda content, meta: self.notes.append((content, meta)),
                          mode=mode, client_factory=FakeClient, **kw)
        b.start()
        return b

    def call(self, b, tool, **arguments):
        return self.successResultOf(b.call(tool, arguments))

    def test_push_mode(self):
        """A message is one channel notification (string meta); check_messages does not repeat."""
        b = self.make()
        link = b.links[0]
        acked = link.client.kw["on_message"](inbound("hello there"))
        self.successResultOf(acked)  # the client acks once it fires
        [(content, meta)] = self.notes
        self.assertEqual(content, "alice: hello there")
        self.assertTrue(all(isinstance(v, str) for v in meta.values()))
        self.assertEqual((meta["kind"], meta["from_name"], meta["mesh_slug"], meta["priority"],
                          meta["message_id"], meta["sent_at"]),
                         ("direct", "alice", "team", "next", "m-1", "2026-11-28T10:00:00.000Z"))
        self.assertEqual(self.call(b, "check_messages"), bridge.ok("No new messages."))
        self.assertIn("m-1", b.delivery.delivered_ids)

    def test_push_prefixes(self):
        """Urgent, low and broadcast messages are marked in the content."""
        b = self.make()
        deliver = b.links[0].client.kw["on_message"]
        deliver(inbound("a", priority="now", message_id="m-1"))
        deliver(inbound("b", priority="low", target="*", message_id="m-2"))
        deliver(inbound("c", target="@ops", message_id="m-3"))
        self.assertEqual([c for c, _ in self.notes],
                         ["[URGENT] alice: a", "[low] alice (broadcast): b", "alice (@ops): c"])
        self.assertEqual(self.notes[1][1]["kind"], "broadcast")

    def test_unknown_sender_name(self):
        """A sender missing from the member list is shown as peer-<8 hex>."""
        b = self.make()
        b.links[0].client.kw["on_message"](inbound(sender="e" * 64, session="7" * 64))
        self.assertEqual(self.notes[0][1]["from_name"], "peer-eeeeeeee")

    def test_inbox_and_off_modes(self):
        """inbox notifies without the text; off does not notify; both keep the message."""
        b = self.make(mode="inbox")
        b.links[0].client.kw["on_message"](inbound("secret plans"))
        self.assertEqual(self.notes, [("[claudemesh] New message from alice on mesh team. Use "
                                       "the claudemesh check_messages tool to read it.",
                                       {"kind": "inbox_notification",
                                        "from_name": "alice", "mesh_slug": "team"})])
        self.assertIn("secret plans", self.call(b, "check_messages").text)
        b = self.make(mode="off")
        b.links[0].client.kw["on_message"](inbound("quiet"))
        b.links[0].client.kw["on_event"]({"event": "peer_joined", "eventData": {"name": "x"}})
        self.assertEqual(self.notes, [])
        self.assertIn("quiet", self.call(b, "check_messages").text)

    def test_bad_mode(self):
        """An unknown message mode is refused."""
        self.assertRaises(ValueError, self.make, mode="loud")

    def test_peer_events(self):
        """peer_joined/peer_left become [system] notifications in push mode."""
        b = self.make()
        b.links[0].client.kw["on_event"]({"event": "peer_joined", "eventData": {
            "name": "carol", "memberPubkey": "9" * 64}})
        [(content, meta)] = self.notes
        self.assertEqual(content, '[system] Peer "carol" joined the mesh')
        self.assertEqual((meta["kind"], meta["event"]), ("system", "peer_joined"))
        self.assertEqual(b.links[0].names["9" * 64], "carol")

    def test_kicked(self):
        """After a 4001 Claude is told once and every tool answers the kicked message (error)."""
        b = self.make()
        b.links[0].client.kw["on_terminal_close"](4001, "kicked", connection.KICKED_MESSAGE)
        self.assertEqual(self.notes, [("[system] " + connection.KICKED_MESSAGE, {
            "kind": "system", "event": "session_ended", "mesh_slug": "team", "mesh_id": "m1"})])
        for name, arguments in (("list_peers", {}), ("check_messages", {}),
                                ("send_message", {"to": "alice", "message": "x"}),
                                ("set_status", {"status": "idle"}), ("mesh_info", {})):
            self.assertEqual(self.call(b, name, **arguments),
                             bridge.failed(connection.KICKED_MESSAGE), name)

    def test_revoked_through_when_done(self):
        """A terminal outcome reported only by when_done is kept too."""
        b = self.make()
        b.links[0].client.done.errback(connection.TerminalClose(4002, "banned", "gone"))
        self.assertEqual(self.call(b, "list_peers"), bridge.failed("gone"))

    def test_no_meshes_and_problem(self):
        """No mesh joined, or an unreadable config: every tool says so."""
        b = self.make(entries=[])
        self.assertEqual(self.call(b, "list_peers"), bridge.failed(bridge.NO_MESHES))
        b = self.make(entries=[], problem="config broken")
        self.assertEqual(self.call(b, "mesh_info"), bridge.failed("config broken"))

    def test_send_resolves_names(self):
        """Names resolve to member keys; duplicates are sent once; unknown names fail."""
        b = self.make()
        result = self.call(b, "send_message", to=["alice", "Alice", "nobody"], message="hi",
                           priority="now")
        self.assertEqual(result.text.splitlines(),
                         ["✓ alice → msg-1", '✗ nobody: No member matches "nobody".'])
        self.assertFalse(result.error)
        self.assertEqual(b.links[0].client.sent, [(ALICE_MEMBER, "hi", "now")])
        self.assertTrue(self.call(b, "send_message", to="nobody", message="x").error)
        self.assertTrue(self.call(b, "send_message", to="alice", message="x",
                                  priority="soon").error)

    def test_two_meshes_need_a_prefix(self):
        """With two meshes, '*' needs '<mesh>:'; a name on both is ambiguous."""
        b = self.make(entries=[make_entry("team"), make_entry("ops", meshId="m2")])
        result = self.call(b, "send_message", to="*", message="x")
        self.assertTrue(result.error)
        self.assertIn('prefix the target with "<mesh>:"', result.text)
        self.assertIn("on several meshes", self.call(b, "send_message", to="alice",
                                                     message="x").text)
        result = self.call(b, "send_message", to="ops:*", message="all")
        self.assertEqual(result.text, "✓ ops:* → msg-1")
        self.assertEqual(b.links[1].client.sent, [("*", "all", "next")])

    def test_not_connected(self):
        """A mesh still connecting gives a clear, retryable answer."""
        b = self.make()
        b.links[0].client.connected = False
        result = self.call(b, "set_status", status="dnd")
        self.assertTrue(result.error)
        self.assertIn("Not connected to mesh team yet", result.text)

    def test_list_peers_marks_this_session(self):
        """list_peers shows status, cwd and summary, and marks this session."""
        b = self.make()
        lines = self.call(b, "list_peers").text.splitlines()
        self.assertEqual(lines[0], "## team (mesh m1…)")
        self.assertEqual(lines[1], '- **alice** [idle] (pubkey: %s…) cwd: /w — "tests"'
                         % (ALICE_SESSION[:16],))
        self.assertTrue(lines[2].endswith("(this session)"))

    def test_fire_and_forget_tools(self):
        """set_status, set_summary, join_group and leave_group send their frames, checked."""
        b = self.make()
        self.assertFalse(self.call(b, "set_status", status="dnd").error)
        self.assertFalse(self.call(b, "set_summary", summary="refactoring").error)
        self.assertFalse(self.call(b, "join_group", name="ops", role="lead").error)
        self.assertFalse(self.call(b, "leave_group", name="ops").error)
        self.assertEqual(b.links[0].client.checked, [
            {"type": "set_status", "status": "dnd"},
            {"type": "set_summary", "summary": "refactoring"},
            {"type": "join_group", "name": "ops", "role": "lead"},
            {"type": "leave_group", "name": "ops"}])
        self.assertTrue(self.call(b, "set_status", status="busy").error)

    def test_message_status(self):
        """message_status asks the mesh the message went to."""
        b = self.make()
        self.call(b, "send_message", to="alice", message="x")
        text = self.call(b, "message_status", id="msg-1").text
        self.assertIn("alice", text)
        self.assertIn("delivered", text)

    def test_bad_calls(self):
        """Unknown tools and wrong arguments are error results, not crashes."""
        b = self.make()
        self.assertTrue(self.call(b, "frobnicate").error)
        result = self.call(b, "set_status", bogus=1)
        self.assertTrue(result.error)
        self.assertIn("Bad arguments for set_status", result.text)

    def test_report_status(self):
        """The transcript inference goes out as set_status source jsonl on connected meshes."""
        b = self.make(entries=[make_entry("team"), make_entry("ops", meshId="m2")])
        b.links[1].client.connected = False
        b.report_status("working")
        self.assertEqual(b.links[0].client.fired, [{"type": "set_status", "status": "working",
                                                    "source": "jsonl"}])
        self.assertEqual(b.links[1].client.fired, [])
        self.assertEqual(b.status_ttl(), 60)

    def test_client_options(self):
        """Each client gets the session id, session key, pid, cwd and receive=True."""
        b = self.make(session_keys={"team": "KEY"}, pid=4242, cwd="/w",
                      hello_extra={"claudeSessionId": "c1"})
        kw = b.links[0].client.kw
        self.assertEqual((b.links[0].client.session_id, kw["session_identity"], kw["pid"],
                          kw["cwd"], kw["receive"], kw["hello_extra"]),
                         ("sess-1", "KEY", 4242, "/w", True, {"claudeSessionId": "c1"}))

    def test_mesh_info_names_the_key_epoch(self):
        """mesh_info says the key epoch; an owner's asks who left since the last rotation."""
        b = self.make()
        client = b.links[0].client
        client.mesh_keys.current = 0
        text = self.call(b, "mesh_info").text
        self.assertIn("- mesh key: key epoch 0 (held)\n", text + "\n")
        self.assertNotIn("mesh_key_status", [f["type"] for f in client.requests])
        client.hello_ack["role"] = "owner"
        client.key_status = {"type": "mesh_key_status_result", "keyEpoch": 2, "keyStatus": {
            "departedSinceRotation": [{"name": "bob", "pubkey": BOB_MEMBER, "event": "left"}],
            "departedTotal": 1, "withoutKey": []}}
        text = self.call(b, "mesh_info").text
        self.assertIn("- mesh key: key epoch 2 (not held: broadcasts unreadable); bob left"
                      " since the mesh key was last rotated: they can still read broadcasts"
                      " sealed with it. Run 'claudemesh rotate-key'.", text)
