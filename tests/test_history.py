"""
Tests for the local message history (L{claudemesh.client.history}): file
layout and modes, bounds by size and age, reading as the file grows, torn
and foreign lines, several writing processes, and the client writing to it
(L{MeshClient} with C{history=}) on a L{task.Clock}.
"""

import json
import os
import stat
import subprocess
import sys

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from claudemesh import crypto
from claudemesh.client import config, connection, history
from tests.test_client_units import _FakeEndpoint, _FakeProto, make_entry
from tests.test_mcp_server import BrokerProcessMixin

DAY = 86400


class _Clock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


class HistoryFileTests(SynchronousTestCase):
    def setUp(self):
        self.config_dir = self.mktemp()
        self.clock = _Clock()
        self.history = history.History(self.config_dir, "cli", clock=self.clock,
                                       max_bytes=history.MIN_MAX_BYTES, max_age=30 * DAY)

    def texts(self, mesh_id="m1"):
        return [r["text"] for r in self.history.read(mesh_id)]

    def test_round_trip_and_modes(self):
        """Records read back in order with their stamps; the directory is 0700, the file 0600."""
        self.history.append("m1", {"kind": "sent", "text": "one"})
        self.history.append("m1", {"kind": "received", "text": "two <b>"})
        records = self.history.read("m1")
        self.assertEqual([(r["kind"], r["text"], r["via"], r["meshId"], r["at"], r["v"])
                          for r in records],
                         [("sent", "one", "cli", "m1", 1_800_000_000_000, 1),
                          ("received", "two <b>", "cli", "m1", 1_800_000_000_000, 1)])
        directory = os.path.join(self.config_dir, "history")
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.history.path("m1")).st_mode), 0o600)
        self.assertEqual(self.history.read("other"), [])

    def test_mesh_id_cannot_name_another_file(self):
        """A mesh id that is not a plain name is hashed into the file name."""
        self.history.append("../../etc/passwd", {"kind": "sent", "text": "x"})
        path = self.history.path("../../etc/passwd")
        self.assertEqual(os.path.dirname(path), os.path.join(self.config_dir, "history"))
        self.assertEqual(self.texts("../../etc/passwd"), ["x"])

    def test_bounded_by_size(self):
        """Past max_bytes the file is rewritten to its newest records within half of it."""
        text = "x" * 1000
        for i in range(200):
            self.history.append("m1", {"kind": "sent", "text": text, "n": i})
            self.assertLessEqual(os.path.getsize(self.history.path("m1")),
                                 history.MIN_MAX_BYTES + 1100)
        numbers = [r["n"] for r in self.history.read("m1")]
        self.assertEqual(numbers, list(range(numbers[0], 200)))
        self.assertGreater(len(numbers), 20)

    def test_bounded_by_age(self):
        """Records older than max_age are not read, and are dropped by a rewrite."""
        self.history.append("m1", {"kind": "sent", "text": "old"})
        self.clock.now += 31 * DAY
        self.history.append("m1", {"kind": "sent", "text": "new"})
        self.assertEqual(self.texts(), ["new"])
        self.history._compact("m1")
        with open(self.history.path("m1"), "rb") as f:
            self.assertNotIn(b"old", f.read())

    def test_foreign_and_torn_lines_skipped(self):
        """Lines that are not version-1 records are skipped, never fatal."""
        self.history.append("m1", {"kind": "sent", "text": "ok"})
        with open(self.history.path("m1"), "ab") as f:
            f.write(b"\x00\xff garbage\n[1,2]\n{\"v\": 2, \"kind\": \"sent\", \"at\": 1}\n")
            f.write(b'{"v":1,"kind":"evil","at":1}\n{"v":1,"kind":"sent","at":"x"}\n')
        self.history.append("m1", {"kind": "received", "text": "fine"})
        self.assertEqual(self.texts(), ["ok", "fine"])

    def test_tail_reads_what_grows(self):
        """A tail returns only new records, waits for a line's end, and notices a rewrite."""
        tail = self.history.tail("m1")
        self.assertEqual(tail.poll(), [])
        self.history.append("m1", {"kind": "sent", "text": "a"})
        self.assertEqual([r["text"] for r in tail.poll()], ["a"])
        self.assertEqual(tail.poll(), [])
        line = json.dumps({"v": 1, "kind": "sent", "at": 1_800_000_000_000, "text": "b"})
        with open(self.history.path("m1"), "ab") as f:
            f.write(line[:10].encode())
        self.assertEqual(tail.poll(), [])
        with open(self.history.path("m1"), "ab") as f:
            f.write(line[10:].encode() + b"\n")
        self.assertEqual([r["text"] for r in tail.poll()], ["b"])
        self.history._compact("m1")
        self.assertEqual([r["text"] for r in tail.poll()], ["a", "b"])
        self.assertTrue(tail.rewritten)

    def test_several_processes_append(self):
        """Processes appending at once (with rewrites) leave only whole records."""
        script = (
            "import sys\n"
            "from claudemesh.client import history\n"
            "h = history.History(sys.argv[1], sys.argv[2], max_bytes=history.MIN_MAX_BYTES)\n"
            "for i in range(300):\n"
            "    h.append('m1', {'kind': 'sent', 'text': 'y' * 500, 'n': i})\n")
        env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.path.dirname(
            os.path.dirname(os.path.abspath(history.__file__))))
        workers = [subprocess.Popen([sys.executable, "-c", script, self.config_dir, name],
                                    env=env) for name in ("w1", "w2", "w3")]
        for worker in workers:
            self.assertEqual(worker.wait(timeout=60), 0)
        with open(self.history.path("m1"), "rb") as f:
            lines = f.read().splitlines()
        self.assertTrue(lines)
        records = [json.loads(line) for line in lines]
        self.assertEqual({r["text"] for r in records}, {"y" * 500})
        # Each writer's records stay in its order, and the newest one is kept.
        for name in {r["via"] for r in records}:
            numbers = [r["n"] for r in records if r["via"] == name]
            self.assertEqual(numbers, sorted(set(numbers)))
        self.assertEqual(records[-1]["n"], 299)

    def test_from_environ(self):
        """CLAUDEMESH_HISTORY=off turns it off; the bounds come from the environment, checked."""
        self.assertIsNone(history.from_environ({"CLAUDEMESH_HISTORY": "off"}, "ui"))
        h = history.from_environ({"CLAUDEMESH_CONFIG_DIR": "/x",
                                  "CLAUDEMESH_HISTORY_MAX_BYTES": "10",
                                  "CLAUDEMESH_HISTORY_DAYS": "2"}, "ui")
        self.assertEqual((h.directory, h.via, h.max_bytes, h.max_age),
                         ("/x/history", "ui", history.MIN_MAX_BYTES, 2 * DAY))
        h = history.from_environ({"CLAUDEMESH_HISTORY_MAX_BYTES": "lots",
                                  "CLAUDEMESH_HISTORY_DAYS": "-1"}, "ui")
        self.assertEqual((h.max_bytes, h.max_age),
                         (history.DEFAULT_MAX_BYTES, history.DEFAULT_MAX_AGE_DAYS * DAY))


class ClientRecordsTests(SynchronousTestCase):
    """
    A L{MeshClient} with a history records what it sent and what it handed
    over.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.attempts = []
        self.entry = make_entry()
        self.config_dir = self.mktemp()
        self.history = history.History(self.config_dir, "mcp", clock=self.clock.seconds)
        self.handed = []
        self.client = connection.MeshClient(
            self.clock, self.entry, "mcp-1", session_identity=crypto.Identity.generate(),
            on_message=self.handed.append, random=lambda: 0.5,
            endpoint_factory=lambda r, u, t: _FakeEndpoint(self), history=self.history)
        self.client.start()
        factory, d = self.attempts[-1]
        self.proto = _FakeProto()
        d.callback(self.proto)
        self.client._opened(self.proto)
        self.receive({"type": "hello_ack", "role": "member", "_reqId": "hello"})

    def receive(self, frame):
        self.client._received(self.proto, json.dumps(frame).encode())

    def test_sent_recorded_once_queued(self):
        """A queued send_text is recorded with its message id; a refused one is not."""
        d = self.client.send_text("*", "hello all", "now", send_id="s1")
        self.receive({"type": "ack", "id": "s1", "messageId": "msg-1", "queued": True})
        self.successResultOf(d)
        d = self.client.send_text("*", "too much", send_id="s2")
        self.receive({"type": "ack", "id": "s2", "messageId": "", "queued": False,
                      "error": "rate_limit"})
        self.successResultOf(d)
        [record] = self.history.read("m1")
        self.assertEqual(
            (record["kind"], record["messageId"], record["text"], record["targetSpec"],
             record["priority"], record["sessionId"], record["via"], record["senderPubkey"],
             record["senderMemberPubkey"]),
            ("sent", "msg-1", "hello all", "*", "now", "mcp-1", "mcp",
             self.client.session_identity.pubkey, self.entry.pubkey))

    def test_received_recorded(self):
        """A push handed to the application is recorded, opened, once."""
        nonce, ciphertext = crypto.encrypt_broadcast(self.entry.mesh_key, b"<img src=x>")
        push = {"type": "push", "messageId": "msg-9", "meshId": "m1", "targetSpec": "*",
                "senderPubkey": "ab" * 32, "senderMemberPubkey": "ab" * 32,
                "priority": "next", "createdAt": "2027-01-15T08:00:00.000Z", "seq": 3,
                "nonce": nonce, "ciphertext": ciphertext}
        self.receive(push)
        self.receive(push)
        [record] = self.history.read("m1")
        self.assertEqual((record["kind"], record["messageId"], record["text"], record["seq"],
                          record["createdAt"], record["error"]),
                         ("received", "msg-9", "<img src=x>", 3,
                          "2027-01-15T08:00:00.000Z", None))
        self.assertEqual(len(self.handed), 1)

    def test_unwritable_history_does_not_break_messaging(self):
        """An unwritable history logs a warning without the text; the message still arrives."""
        os.makedirs(self.config_dir)
        with open(os.path.join(self.config_dir, "history"), "w") as f:
            f.write("a file where the directory should be")
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        nonce, ciphertext = crypto.encrypt_broadcast(self.entry.mesh_key, b"secret words")
        self.receive({"type": "push", "messageId": "msg-2", "targetSpec": "*",
                      "senderPubkey": "cd" * 32, "nonce": nonce, "ciphertext": ciphertext})
        self.assertEqual([m.text for m in self.handed], ["secret words"])
        acks = [f for f in self.proto.sent if f["type"] == "client_ack"]
        self.assertEqual([a["messageId"] for a in acks], ["msg-2"])
        warnings = [e for e in logged if "history" in str(e.get("log_format", ""))]
        self.assertEqual(len(warnings), 1)
        self.assertNotIn("secret", repr(warnings))


class SessionsWriteHistoryTests(BrokerProcessMixin, SynchronousTestCase):
    """
    The real processes write the history: C{claudemesh mcp} (a Claude Code
    session) and the CLI, against a twistd broker.
    """

    def setUp(self):
        self.start_broker()
        self.mesh_with("alice")

    def records(self, who):
        directory = os.path.join(self.tmp, who, "config")
        [entry] = config.load(directory).meshes
        return history.History(directory, "test").read(entry.meshId)

    def test_mcp_and_cli_record_both_ways(self):
        """A Claude Code session records what it gets and sends; the CLI's send and inbox too."""
        alice = self.mcp("alice", "alice-claude-1")
        self.wait_for(lambda: "alice" in self.ok("owner", "peers"), what="alice online")
        self.ok("owner", "send", "alice", "hello <b>alice</b>")
        self.wait_for(lambda: [r for r in self.records("alice") if r["kind"] == "received"],
                      what="alice's history")
        text, error = alice.call("send_message", to="owner", message="hi owner")
        self.assertFalse(error, text)
        self.ok("owner", "inbox", "--wait", "2")
        mine = [(r["kind"], r["via"], r["text"]) for r in self.records("alice")]
        self.assertEqual(mine, [("received", "mcp", "hello <b>alice</b>"),
                                ("sent", "mcp", "hi owner")])
        theirs = [(r["kind"], r["via"], r["text"]) for r in self.records("owner")]
        self.assertEqual(theirs, [("sent", "cli", "hello <b>alice</b>"),
                                  ("received", "cli", "hi owner")])
        self.assertEqual(self.records("alice")[1]["sessionId"], "alice-claude-1")
