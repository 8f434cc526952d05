"""
The way a mesh message reaches the model, without a reactor: the inbox
socket client (L{claudemesh.mcpserver.inbox}) against fake connections
(accepted, refused, closed early, slow, oversized text), the delivered-ids
store (L{claudemesh.mcpserver.delivered}), the path order and the hooks'
answers (L{claudemesh.mcpserver.delivery} through the bridge), and the
local socket's request protocol (L{claudemesh.mcpserver.localserver}).
"""

import json
import os
import time

from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from claudemesh.mcpserver import bridge, delivered, delivery, inbox, local, localserver
from tests.test_client_units import make_entry
from tests.test_mcp_bridge import FakeClient, inbound


class FakeEndpoint:
    """
    An endpoint that connects to a L{StringTransport}, refuses, or hangs.
    """

    def __init__(self, refuse=False, hang=False):
        self.refuse = refuse
        self.hang = hang
        self.transport = None
        self.protocol = None
        self.pending = None

    def connect(self, factory):
        if self.refuse:
            return defer.fail(error.ConnectionRefusedError("no one listens"))
        if self.hang:
            self.pending = defer.Deferred()
            return self.pending
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


class InboxSocketTests(SynchronousTestCase):
    """
    L{inbox.InboxSocket.deliver} fires only once the socket took the whole
    message, and fails (so the next path is tried) otherwise.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()

    def socket(self, endpoint, token="tok"):
        return inbox.InboxSocket(self.clock, "/run/cc.sock", token,
                                 endpoint_factory=lambda r, p, t: endpoint)

    def test_accepted(self):
        """The auth line then the message line are written; a clean close fires (not cut)."""
        endpoint = FakeEndpoint()
        d = self.socket(endpoint).deliver("hello", "now")
        self.assertNoResult(d)
        auth, message, rest = endpoint.transport.value().split(b"\n")
        self.assertEqual(json.loads(auth), {"type": "auth", "token": "tok"})
        self.assertEqual(json.loads(message), {
            "type": "user", "message": {"role": "user", "content": "hello"}, "priority": "now"})
        self.assertEqual(rest, b"")
        self.assertTrue(endpoint.transport.disconnecting)
        endpoint.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertIs(self.successResultOf(d), False)

    def test_no_token_no_auth_line(self):
        """Without a token only the message line is sent; low is spelled 'later'."""
        endpoint = FakeEndpoint()
        self.socket(endpoint, token=None).deliver("x", "low")
        [line] = endpoint.transport.value().splitlines()
        self.assertEqual(json.loads(line)["priority"], "later")

    def test_refused(self):
        """A socket nobody listens on fails with InboxRefused."""
        socket = self.socket(FakeEndpoint(refuse=True))
        failure = self.failureResultOf(socket.deliver("hello"), inbox.InboxRefused)
        self.assertIn("cannot connect", str(failure.value))
        self.assertEqual((socket.delivered, socket.failed), (0, 1))

    def test_closed_early(self):
        """A connection lost before the message was written fails."""
        endpoint = FakeEndpoint()
        d = self.socket(endpoint).deliver("hello")
        endpoint.protocol.connectionLost(Failure(error.ConnectionLost("broken pipe")))
        self.failureResultOf(d, inbox.InboxRefused)

    def test_slow_reader(self):
        """A session that never reads: after the timeout the connection is aborted and it fails."""
        endpoint = FakeEndpoint()
        d = self.socket(endpoint).deliver("hello")
        self.clock.advance(inbox.TIMEOUT_SECONDS - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIn("timed out", str(self.failureResultOf(d, inbox.InboxRefused).value))
        self.assertTrue(endpoint.transport.disconnecting)
        # The late close of the aborted connection changes nothing.
        endpoint.protocol.connectionLost(Failure(error.ConnectionAborted()))

    def test_connect_hangs(self):
        """A connect that never completes is cancelled at the timeout."""
        endpoint = FakeEndpoint(hang=True)
        d = self.socket(endpoint).deliver("hello")
        self.clock.advance(inbox.TIMEOUT_SECONDS)
        self.failureResultOf(d, inbox.InboxRefused)
        self.assertTrue(endpoint.pending.called)  # cancelled

    def test_oversized_text_is_cut_with_a_note(self):
        """Text over the 1,048,576-character line is cut, says so, and the line fits."""
        for text in ("x" * 2_000_000, "\n" * 700_000 + "end"):
            line, cut = inbox.message_line(text)
            self.assertTrue(cut)
            self.assertLessEqual(len(line), inbox.MAX_LINE_CHARS)
            content = json.loads(line)["message"]["content"]
            self.assertIn("this message was cut to fit Claude Code's inbox", content)
            self.assertIn("of %d characters shown" % (len(text),), content)
        line, cut = inbox.message_line("y" * 1000)
        self.assertFalse(cut)
        endpoint = FakeEndpoint()
        d = self.socket(endpoint).deliver("z" * 1_100_000)
        endpoint.protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertIs(self.successResultOf(d), True)

    def test_empty_text_refused(self):
        """Claude Code ignores empty content, so it is refused before connecting."""
        self.failureResultOf(self.socket(FakeEndpoint()).deliver(""), inbox.InboxRefused)

    def test_environment(self):
        """The socket and token come from Claude Code's two variables; no socket, no token."""
        self.assertEqual(inbox.socket_from({"CLAUDE_CODE_MESSAGING_SOCKET": "/s",
                                            "CLAUDE_CODE_MESSAGING_TOKEN": "t"}), ("/s", "t"))
        self.assertEqual(inbox.socket_from({"CLAUDE_CODE_MESSAGING_TOKEN": "t"}), (None, None))


class CrossSessionInboundTests(SynchronousTestCase):
    """
    Claude Code's crossSessionInbound setting, read as the session reads it.
    """

    def write(self, path, document):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document))

    def test_precedence(self):
        """The project's local settings beat the project's, which beat the user's; unset is None."""
        root = os.path.abspath(self.mktemp())
        home, cwd = os.path.join(root, "home"), os.path.join(root, "work")
        self.patch(inbox, "MANAGED_SETTINGS", os.path.join(root, "managed.json"))
        environ = {"HOME": home}
        self.assertIsNone(inbox.cross_session_inbound(environ, cwd))
        self.write(os.path.join(home, ".claude", "settings.json"), {"crossSessionInbound": "hold"})
        self.assertEqual(inbox.cross_session_inbound(environ, cwd), "hold")
        self.write(os.path.join(cwd, ".claude", "settings.json"), {"crossSessionInbound": "refuse"})
        self.assertEqual(inbox.cross_session_inbound(environ, cwd), "refuse")
        self.write(os.path.join(cwd, ".claude", "settings.local.json"), "{broken")
        self.assertEqual(inbox.cross_session_inbound(environ, cwd), "refuse")
        self.write(os.path.join(root, "managed.json"), {"crossSessionInbound": "accept"})
        self.assertEqual(inbox.cross_session_inbound(environ, cwd), "accept")
        self.write(os.path.join(root, "managed.json"), {"crossSessionInbound": 7})
        self.assertEqual(inbox.cross_session_inbound(environ, cwd), "refuse")


class DeliveredIdsTests(SynchronousTestCase):
    """
    The on-disk memory of delivered ids: kept across instances, bounded,
    private, pruned when old.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_survives_a_restart(self):
        """An id added by one server is known to the next one of the same session."""
        ids = delivered.DeliveredIds.in_config_dir(self.dir, "s-abc")
        ids.add("m-1")
        again = delivered.DeliveredIds.in_config_dir(self.dir, "s-abc")
        self.assertIn("m-1", again)
        self.assertNotIn("m-1", delivered.DeliveredIds.in_config_dir(self.dir, "s-other"))
        path = os.path.join(self.dir, "delivered", "s-abc.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)

    def test_bounded(self):
        """Only the newest `limit` ids are kept, in memory and on disk."""
        ids = delivered.DeliveredIds(os.path.join(self.dir, "x.json"), limit=3)
        for n in range(5):
            ids.add("m-%d" % (n,))
        self.assertEqual((len(ids), "m-1" in ids, "m-2" in ids), (3, False, True))
        reread = delivered.DeliveredIds(os.path.join(self.dir, "x.json"), limit=3)
        self.assertEqual(len(reread), 3)
        self.assertIn("m-4", reread)

    def test_config_dir_not_made(self):
        """A missing config directory is not created (it would not be 0700): an OSError."""
        missing = os.path.join(self.dir, "nope")
        self.assertRaises(OSError, delivered.DeliveredIds.in_config_dir, missing, "s-x")
        self.assertFalse(os.path.exists(missing))

    def test_memory_only(self):
        """Without a path (the config directory is unusable) it remembers in memory, bounded."""
        ids = delivered.DeliveredIds(None, limit=2)
        for n in range(3):
            ids.add("m-%d" % (n,))
        self.assertEqual((len(ids), "m-0" in ids, "m-2" in ids), (2, False, True))

    def test_corrupt_file_is_empty(self):
        """A file that is not a JSON list of strings reads as empty, never crashes."""
        path = os.path.join(self.dir, "bad.json")
        for data in (b"{not json", b'{"a": 1}', b'[1, null, "m-9"]', b"\xff\xfe"):
            with open(path, "wb") as f:
                f.write(data)
            ids = delivered.DeliveredIds(path)
            self.assertEqual(list(ids._ids), ["m-9"] if b"m-9" in data else [])

    def test_old_files_pruned(self):
        """Files of sessions untouched for two weeks are removed when a server starts."""
        ids = delivered.DeliveredIds.in_config_dir(self.dir, "s-old")
        ids.add("m")
        old = time.time() - delivered.MAX_AGE_SECONDS - 10
        os.utime(ids.path, (old, old))
        delivered.DeliveredIds.in_config_dir(self.dir, "s-new")
        self.assertFalse(os.path.exists(ids.path))

    def test_session_key(self):
        """A launched session is keyed by its id; another by Claude Code's pid and start time."""
        self.assertEqual(delivered.session_key("a/b c"), "s-a_b_c")
        proc = os.path.join(self.dir, "proc")
        os.makedirs(os.path.join(proc, "42"))
        fields = ["S"] + [str(n) for n in range(30)]
        with open(os.path.join(proc, "42", "stat"), "w") as f:
            f.write("42 (claude (x)) " + " ".join(fields))
        self.assertEqual(delivered.session_key(None, 42, proc), "p-42-%s" % (fields[19],))
        self.assertEqual(delivered.session_key(None, 43, proc), "p-43-0")


class FakeInbox:
    """
    An L{inbox.InboxSocket} stand-in: takes, cuts or refuses.
    """

    def __init__(self, outcome="take"):
        self.outcome = outcome
        self.got = []

    def deliver(self, text, priority="next"):
        self.got.append((text, priority))
        if self.outcome == "refuse":
            return defer.fail(inbox.InboxRefused("gone"))
        return defer.succeed(self.outcome == "cut")


class DeliveryPathTests(SynchronousTestCase):
    """
    One path per message, in order inbox → channel → hooks; never twice.
    """

    def make(self, mode="push", inbox_socket=None, channel=False, ids=None, entries=None):
        self.clock = MemoryReactorClock()
        self.notes = []
        self.reported = []
        self.ids = set() if ids is None else ids
        paths = delivery.Delivery(mode, self.ids, inbox=inbox_socket,
                                  notify=lambda c, m: self.notes.append((c, m)),
                                  channel_ready=lambda: channel)
        b = bridge.Bridge(self.clock, entries or [make_entry("team")], "sess-1", None,
                          mode=mode, client_factory=FakeClient, delivery=paths,
                          report_hook=lambda s, p: self.reported.append((s, p)))
        b.start()
        return b

    def push(self, b, **kw):
        d = b.links[0].client.kw["on_message"](inbound(**kw))
        return self.successResultOf(d)

    def hook(self, b, event, status="working", **payload):
        return b.answer_local({"op": "hook", "event": event, "status": status,
                               "payload": payload})["output"]

    def test_inbox_first(self):
        """With a socket the message goes there (who, where, how to answer), and nowhere else."""
        socket = FakeInbox()
        b = self.make(inbox_socket=socket, channel=True)
        self.push(b, text="build is green", priority="now")
        [(text, priority)] = socket.got
        self.assertEqual(priority, "now")
        self.assertTrue(text.startswith("[claudemesh] Message from alice on mesh team (direct, "
                                        "priority now, sent 2026-11-28 10:00:00 UTC):"), text)
        self.assertIn("\n\nbuild is green\n\n", text)
        self.assertIn('send_message tool with to="alice"', text)
        self.assertEqual(self.notes, [])
        self.assertIn("m-1", self.ids)
        self.assertIsNone(self.hook(b, "UserPromptSubmit"))
        self.assertIsNone(self.hook(b, "Stop", "idle"))
        self.assertEqual(self.successResultOf(b.call("check_messages", {})).text,
                         "No new messages.")
        self.assertEqual(b.delivery.last_path, "inbox")

    def test_refused_socket_falls_to_the_channel(self):
        """A refusing socket hands the message to the channel, once."""
        b = self.make(inbox_socket=FakeInbox("refuse"), channel=True)
        self.push(b, text="hi")
        self.assertEqual([c for c, _ in self.notes], ["alice: hi"])
        self.assertIsNone(self.hook(b, "UserPromptSubmit"))

    def test_refused_socket_falls_to_the_hooks(self):
        """No socket that works and no channel: the next prompt's context carries it, once."""
        b = self.make(inbox_socket=FakeInbox("refuse"))
        self.push(b, text="please rebase", message_id="m-7")
        self.assertNotIn("m-7", self.ids)  # not given to the model yet
        self.assertEqual(b.status_line(), "team · 1 online · ✉ 1")
        output = self.hook(b, "UserPromptSubmit")
        self.assertEqual(list(output), ["hookSpecificOutput"])
        self.assertEqual(output["hookSpecificOutput"]["hookEventName"], "UserPromptSubmit")
        context = output["hookSpecificOutput"]["additionalContext"]
        self.assertIn("1 message(s) from mesh peers arrived", context)
        self.assertIn("Message from alice on mesh team (direct, priority next", context)
        self.assertIn("please rebase", context)
        self.assertIn("m-7", self.ids)
        self.assertIsNone(self.hook(b, "UserPromptSubmit"))
        self.assertEqual(b.status_line(), "team · 1 online · ✉ 0")
        self.assertEqual(self.reported[0][0], "working")

    def test_stop_blocks_once(self):
        """Stop blocks with pending now/next messages, once; low ones wait for the next prompt."""
        b = self.make()
        b.delivery.channel_ready = lambda: False
        self.push(b, text="urgent", priority="now", message_id="m-1")
        self.push(b, text="later", priority="low", message_id="m-2")
        self.assertIsNone(self.hook(b, "Stop", "idle", stop_hook_active=True))
        output = self.hook(b, "Stop", "idle", stop_hook_active=False)
        self.assertEqual(output["decision"], "block")
        self.assertIn("urgent", output["reason"])
        self.assertNotIn("later", output["reason"])
        self.assertIsNone(self.hook(b, "Stop", "idle"))
        context = self.hook(b, "UserPromptSubmit")["hookSpecificOutput"]["additionalContext"]
        self.assertIn("later", context)
        self.assertNotIn("urgent", context)
        self.assertEqual(self.reported, [("idle", {"stop_hook_active": True}),
                                         ("idle", {"stop_hook_active": False}),
                                         ("idle", {}), ("working", {})])

    def test_dedupe_across_restart(self):
        """An id delivered by an earlier server of the session is acked and given to nobody."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ids = delivered.DeliveredIds.in_config_dir(directory, "s-x")
        first = FakeInbox()
        b = self.make(inbox_socket=first, ids=ids)
        self.push(b, text="once")
        # A restarted server of the same session; the broker pushes it again.
        second = FakeInbox()
        b2 = self.make(inbox_socket=second,
                       ids=delivered.DeliveredIds.in_config_dir(directory, "s-x"))
        self.push(b2, text="once")
        self.assertEqual((len(first.got), second.got), (1, []))
        self.assertIsNone(self.hook(b2, "UserPromptSubmit"))
        self.assertEqual(self.successResultOf(b2.call("check_messages", {})).text,
                         "No new messages.")

    def test_cut_message_stays_for_check_messages(self):
        """A message the socket had to cut is still whole in check_messages, and only there."""
        b = self.make(inbox_socket=FakeInbox("cut"))
        self.push(b, text="long")
        self.assertIsNone(self.hook(b, "UserPromptSubmit"))
        text = self.successResultOf(b.call("check_messages", {})).text
        self.assertIn("1 new message(s)", text)
        self.assertIn("long", text)

    def test_inbox_mode_announces(self):
        """In inbox mode the socket gets a notice; the text comes from check_messages, once."""
        socket = FakeInbox()
        b = self.make(mode="inbox", inbox_socket=socket)
        self.push(b, text="the details")
        [(text, _)] = socket.got
        self.assertNotIn("the details", text)
        self.assertIn("check_messages", text)
        self.assertIsNone(self.hook(b, "UserPromptSubmit"))  # announced already
        self.assertIn("the details", self.successResultOf(b.call("check_messages", {})).text)
        self.assertEqual(self.successResultOf(b.call("check_messages", {})).text,
                         "No new messages.")

    def test_off_mode_keeps_quiet(self):
        """In off mode nothing is delivered live, nor by the hooks."""
        socket = FakeInbox()
        b = self.make(mode="off", inbox_socket=socket)
        self.push(b, text="quiet")
        self.assertEqual(socket.got, [])
        self.assertIsNone(self.hook(b, "UserPromptSubmit"))
        self.assertIn("quiet", self.successResultOf(b.call("check_messages", {})).text)

    def test_events_wait_for_the_next_prompt(self):
        """A peer joining does not wake the session; the next prompt mentions it."""
        socket = FakeInbox()
        b = self.make(inbox_socket=socket)
        b.links[0].client.kw["on_event"]({"event": "peer_joined", "eventData": {"name": "bob"}})
        self.assertEqual(socket.got, [])
        context = self.hook(b, "UserPromptSubmit")["hookSpecificOutput"]["additionalContext"]
        self.assertEqual(context, 'claudemesh events: Peer "bob" joined the mesh')

    def test_kick_goes_live(self):
        """Being kicked is told through the socket at once."""
        socket = FakeInbox()
        b = self.make(inbox_socket=socket)
        b.links[0].client.kw["on_terminal_close"](4001, "kicked", "Kicked from this mesh.")
        self.assertEqual(socket.got, [("[claudemesh] Kicked from this mesh.", "next")])

    def test_session_start_context(self):
        """SessionStart says who and where you are, who is online, and how messages arrive."""
        b = self.make(inbox_socket=FakeInbox())
        b.links[0].client.kw["on_connect"]({"memberDisplayName": "me"})
        self.clock.advance(0)  # the peer list asked for on connect
        output = self.hook(b, "SessionStart", "idle")["hookSpecificOutput"]
        self.assertEqual(output["hookEventName"], "SessionStart")
        context = output["additionalContext"]
        self.assertIn('You are "me" on mesh team; online: alice [idle].', context)
        self.assertIn("as messages from another session", context)

    def test_two_meshes_reply_with_prefix(self):
        """With two meshes the reply hint names the mesh too."""
        socket = FakeInbox()
        b = self.make(inbox_socket=socket,
                      entries=[make_entry("team"), make_entry("ops", meshId="m2")])
        self.successResultOf(b.links[1].client.kw["on_message"](inbound()))
        self.assertIn('to="ops:alice"', socket.got[0][0])

    def test_big_backlog_is_bounded(self):
        """A hook answer stays within its size; what does not fit waits for the next one."""
        b = self.make()
        b.delivery.channel_ready = lambda: False
        for n in range(3):
            self.push(b, text="x" * 9000, message_id="m-%d" % (n,))
        first = self.hook(b, "UserPromptSubmit")["hookSpecificOutput"]["additionalContext"]
        self.assertLess(len(first), delivery.MAX_HOOK_CHARS + 1000)
        self.assertIn("2 message(s)", first)
        second = self.hook(b, "UserPromptSubmit")["hookSpecificOutput"]["additionalContext"]
        self.assertIn("1 message(s)", second)

    def test_waiting_is_bounded(self):
        """Messages nobody takes (off mode) are kept up to MAX_WAITING, the oldest dropped."""
        self.patch(delivery, "MAX_WAITING", 3)
        b = self.make(mode="off")
        for n in range(5):
            self.push(b, text="m%d" % (n,), message_id="m-%d" % (n,))
        text = self.successResultOf(b.call("check_messages", {})).text
        self.assertTrue(text.startswith("3 new message(s)"), text)
        self.assertNotIn("m1", text)
        self.assertIn("m4", text)

    def test_bad_local_requests(self):
        """Unknown ops and odd payloads get an answer, never an exception."""
        b = self.make()
        self.assertEqual(b.answer_local({"op": "nope"}), {"error": "unknown op"})
        self.assertEqual(b.answer_local({"op": "hook", "event": 5, "payload": "x"}),
                         {"output": None})


class LocalRequestTests(SynchronousTestCase):
    """
    The local socket's protocol: one JSON line in, one out, then close.
    """

    def connect(self, answer):
        clock = MemoryReactorClock()
        proto = localserver.LocalFactory(clock, answer).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return clock, proto, transport

    def test_answer(self):
        """A request line gets the answer as one JSON line and the connection closes."""
        _, proto, transport = self.connect(lambda request: {"echo": request["op"]})
        proto.dataReceived(b'{"op":"statusline"}\n')
        self.assertEqual(json.loads(transport.value()), {"echo": "statusline"})
        self.assertTrue(transport.value().endswith(b"\n"))
        self.assertTrue(transport.disconnecting)

    def test_garbage_and_oversize(self):
        """Not JSON, not an object, or too long: an error line, never the answer callable."""
        called = []
        for data in (b"not json\n", b"[1]\n", b"\xff\n",
                     b"x" * (local.MAX_LINE_BYTES + 10) + b"\n"):
            _, proto, transport = self.connect(called.append)
            proto.dataReceived(data)
            self.assertIn("error", json.loads(transport.value()))
        self.assertEqual(called, [])

    def test_silent_client_is_dropped(self):
        """A client that says nothing is cut off after a moment."""
        clock, proto, transport = self.connect(lambda r: {})
        clock.advance(localserver.IDLE_SECONDS)
        self.assertTrue(transport.disconnecting)

    def test_failing_answer(self):
        """An answer that raises becomes an internal error reply (logged, not crashed)."""
        def boom(request):
            raise RuntimeError("x")

        _, proto, transport = self.connect(boom)
        proto.dataReceived(b"{}\n")
        self.assertEqual(json.loads(transport.value()), {"error": "internal error"})
        self.flushLoggedErrors(RuntimeError)


class ClaudeCodePidTests(SynchronousTestCase):
    """
    The hook finds its Claude Code through /bin/sh -c.
    """

    def proc(self, entries):
        root = os.path.abspath(self.mktemp())
        for pid, (name, parent) in entries.items():
            os.makedirs(os.path.join(root, str(pid)))
            with open(os.path.join(root, str(pid), "stat"), "w") as f:
                f.write("%d (%s) S %d 1 1 0 -1\n" % (pid, name, parent))
        return root

    def test_through_a_shell(self):
        """Parent 'sh' (a hook without exec): the grandparent is Claude Code."""
        root = self.proc({200: ("sh", 100), 100: ("claude", 1)})
        self.assertEqual(local.claude_code_pid(200, root), 100)

    def test_direct_parent(self):
        """Parent claude (a hook installed with exec): the parent itself."""
        root = self.proc({100: ("claude", 1)})
        self.assertEqual(local.claude_code_pid(100, root), 100)
        self.assertEqual(local.claude_code_pid(999, root), 999)  # no /proc entry
