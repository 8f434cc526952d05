"""
claudemesh with the real Claude Code (the pinned npm package, see
L{tests.claudecode}): an interactive session under a pty, offline against a
loopback stand-in for the Messages API, with claudemesh registered by
C{claudemesh install}, started by C{claudemesh launch}, and a real broker
(C{twistd}) with a second member playing the peer through its own MCP
server.

What is asserted is what a user of the mesh sees: a message to an idle
session starts a model request by itself; a C{now} message to a busy
session reaches the model in that turn or right after it; a C{send_message}
tool call the model makes reaches the peer; no message reaches the model
twice; the status line shows the mesh; and with the inbox socket taken away
from the MCP server, the hooks deliver on the next prompt and when a turn
ends.

Skipped, saying why, where npm is missing (CI installs Node and npm). Every
process (Claude Code and its MCP server, the broker, the peer) is stopped
after each test.
"""

import json
import os
import shutil
import time
import uuid

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests import claudecode
from tests.test_cli_commands import claudemesh_command
from tests.test_mcp_server import BrokerProcessMixin

KEY = "sk-ant-api03-claudemesh-test-" + "0" * 60
TOOL = "mcp__claudemesh__send_message"
TIMEOUT = 45


class RealClaudeCodeTests(BrokerProcessMixin, SynchronousTestCase):
    """
    Messages reach a live Claude Code session.
    """

    def setUp(self):
        try:
            self.claude = claudecode.install_claude_code()
        except claudecode.Unavailable as e:
            if os.environ.get("CLAUDEMESH_REQUIRE_CLAUDE_CODE"):
                # CI installs npm: there, not running is a failure.
                self.fail("the real Claude Code test cannot run: %s" % (e,))
            raise SkipTest(str(e))
        self.start_broker()
        self.mesh_with("alice")
        self.api = claudecode.FakeMessagesAPI()
        self.addCleanup(self.api.close)
        self.home = os.path.join(self.tmp, "alice", "home")
        self.work = os.path.join(self.tmp, "alice", "work")
        os.makedirs(os.path.join(self.home, ".claude"), exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        self.seed_claude_home()
        code, out, err = self.cm("alice", "install", env=self.alice_env())
        self.assertEqual(code, 0, out + err)
        self.peer = self.mcp("owner", str(uuid.uuid4()))
        # CLAUDEMESH_REAL_CLAUDE_LOGS=<dir> keeps Claude Code's debug log and
        # screen there (to see what Claude Code thought).
        logs = os.environ.get("CLAUDEMESH_REAL_CLAUDE_LOGS") or self.tmp
        os.makedirs(logs, exist_ok=True)
        self.debug_log = os.path.join(logs, "%s-debug.log" % (self._testMethodName,))
        self.pty_log = os.path.join(logs, "%s-pty.log" % (self._testMethodName,))
        self.addCleanup(self.dump_requests, os.path.join(
            logs, "%s-requests.json" % (self._testMethodName,)))

    def seed_claude_home(self):
        """
        A first-run Claude Code asks about onboarding, the folder's trust
        and the API key: answered in advance, as a user who said yes once.
        The claudemesh tools are allowed (Claude Code would ask the first
        time).
        """
        with open(os.path.join(self.home, ".claude.json"), "w") as f:
            json.dump({"hasCompletedOnboarding": True, "theme": "dark", "numStartups": 3,
                       "customApiKeyResponses": {"approved": [KEY[-20:]], "rejected": []},
                       "projects": {self.work: {"hasTrustDialogAccepted": True,
                                                "hasCompletedProjectOnboarding": True}}}, f)
        with open(os.path.join(self.home, ".claude", "settings.json"), "w") as f:
            json.dump({"permissions": {"allow": [TOOL, "mcp__claudemesh__check_messages",
                                                 "mcp__claudemesh__list_peers"]}}, f)

    def alice_env(self, **extra):
        path = os.pathsep.join([os.path.dirname(self.claude),
                                os.path.dirname(claudemesh_command()[0]), "/usr/bin", "/bin"])
        env = self.env("alice", PATH=path, TERM="xterm-256color", LANG="C.UTF-8")
        # Nothing of a Claude Code or API set-up of the machine running the
        # test may leak in (another provider, a real key, a session's inbox).
        for key in list(env):
            if key.startswith(("ANTHROPIC_", "CLAUDE_", "AWS_", "GOOGLE_", "VERTEX_")):
                del env[key]
        env.update(ANTHROPIC_BASE_URL=self.api.url, ANTHROPIC_API_KEY=KEY,
                   DISABLE_AUTOUPDATER="1", DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1",
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", **extra)
        return env

    def without_inbox_socket(self, **variables):
        """
        Start the MCP server with Claude Code's inbox variables removed
        (C{env -u}), as on a Claude Code that has no inbox socket, and
        C{variables} set.
        """
        path = os.path.join(self.home, ".claude.json")
        with open(path) as f:
            document = json.load(f)
        entry = document["mcpServers"]["claudemesh"]
        entry["args"] = ["-u", "CLAUDE_CODE_MESSAGING_SOCKET", "-u",
                         "CLAUDE_CODE_MESSAGING_TOKEN"] + [
            "%s=%s" % item for item in sorted(variables.items())] + [
            entry["command"]] + entry["args"]
        entry["command"] = shutil.which("env") or "/usr/bin/env"
        with open(path, "w") as f:
            json.dump(document, f)

    def launch(self):
        """
        C{claudemesh launch} on a pty; returns once the prompt is there and
        the session is on the mesh.
        """
        self.terminal = claudecode.ClaudeTerminal(
            claudemesh_command() + ["launch", "--", "--debug-file", self.debug_log],
            self.alice_env(), self.work, self.pty_log)
        self.addCleanup(self.terminal.close)
        self.assertTrue(self.terminal.wait_for_text("❯", timeout=TIMEOUT),
                        "no prompt: " + self.terminal.screen_text()[-2000:])
        self.wait_for(lambda: "alice" in self.peer.call("list_peers")[0], timeout=TIMEOUT,
                      what="alice's session on the mesh")

    def send(self, text, priority="next"):
        result, error = self.peer.call("send_message", to="alice", message=text,
                                       priority=priority)
        self.assertFalse(error, result)

    def request_with(self, marker, after=0, last=True):
        """
        The first conversation request (numbered above C{after}) whose last
        user message (C{last}) or any text the model reads holds C{marker}.
        """
        for request in self.api.conversation():
            if request["n"] <= after:
                continue
            if last:
                texts = claudecode.user_texts(request["body"])
                found = bool(texts) and marker in texts[-1]
            else:
                found = marker in claudecode.visible_text(request["body"])
            if found:
                return request
        return None

    def wait_request(self, marker, after=0, last=True, timeout=TIMEOUT):
        return self.wait_for(lambda: self.request_with(marker, after, last), timeout=timeout,
                             what="a model request with %r" % (marker,))

    def assert_once(self, *markers):
        """
        No message reached the model twice. Each request carries the whole
        conversation, so a second delivery shows as a marker seen more often
        than in the requests before (a hook's context may be dropped from
        later requests, so fewer is fine, but never again after that).
        """
        requests = self.api.conversation()
        for marker in markers:
            counts = [claudecode.visible_text(r["body"]).count(marker) for r in requests]
            seen = [c for c in counts[next(i for i, c in enumerate(counts) if c):]]
            self.assertEqual(seen, sorted(seen, reverse=True), (marker, counts))

    def assert_one_user_message(self, *markers):
        """
        Through the inbox socket: in the conversation as the model last saw
        it, each marker is in exactly one user message.
        """
        texts = claudecode.user_texts(self.api.conversation()[-1]["body"])
        for marker in markers:
            self.assertEqual(len([t for t in texts if marker in t]), 1, marker)

    def assert_one_hook_answer(self, *markers):
        """
        Through the hooks: according to Claude Code's debug log, exactly one
        hook answer carried each marker.
        """
        with open(self.debug_log, encoding="utf-8", errors="replace") as f:
            answers = [line for line in f if "Hooks: Parsed initial response" in line]
        for marker in markers:
            self.assertEqual(len([a for a in answers if marker in a]), 1, marker)

    def test_inbox_socket(self):
        """Idle DM starts a turn; a busy turn gets a now message; send_message round trip; once."""
        self.launch()
        self.report("Claude Code %s, API stand-in %s" % (claudecode.CLAUDE_CODE_VERSION,
                                                          self.api.url))

        # 1. An idle session gets a DM as a new model request, nobody typing.
        before = self.api.count()
        started = time.monotonic()
        self.send("marker-idle: the build is green")
        request = self.wait_request("marker-idle", after=before)
        self.report("idle DM → model request #%d after %.2f s" % (
            request["n"], request["at"] - started))
        text = claudecode.user_texts(request["body"])[-1]
        self.report("the model saw: %r" % (text[text.find("Another"):][:160],))
        self.assertIn("Message from owner on mesh team", text)
        self.assertIn('to="owner"', text)
        # The status line (installed by claudemesh install) shows the mesh
        # from the MCP server's state: the peer online, nothing waiting.
        self.assertTrue(self.terminal.wait_for_text("1 online · ✉ 0", timeout=TIMEOUT),
                        self.terminal.screen_text()[-1500:])
        self.report("status line on screen: '… 1 online · ✉ 0'")

        # 2. The model answers with a send_message tool call: it reaches the
        # peer (round trip).
        self.api.script("marker-rt", claudecode.Answer(tool=(TOOL, {
            "to": "owner", "message": "pong from alice"})))
        self.send("marker-rt: please answer me")
        self.wait_request("marker-rt")
        reply = self.wait_for(lambda: self.peer_inbox("pong from alice"), timeout=TIMEOUT,
                              what="alice's answer at the peer")
        self.report("round trip: the peer got %r" % (reply,))
        result = self.wait_request("✓ owner → ", after=request["n"])
        self.report("tool result in model request #%d" % (result["n"],))

        # 3. A busy session (a turn streaming for 8 s) gets a `now` message
        # in that turn or right after it.
        self.api.script("marker-busy", claudecode.Answer(
            "working on it " + "slowly " * 40, seconds=8))
        self.terminal.type("marker-busy: write a long answer")
        busy = self.wait_request("marker-busy")
        sent_at = time.monotonic()
        self.send("marker-now: stop and look at this", priority="now")
        now = self.wait_request("marker-now", after=busy["n"], last=False, timeout=60)
        self.report("now message during a busy turn (request #%d%s) → model request #%d, "
                    "%.2f s after sending, %.2f s after the busy turn began" % (
                        busy["n"], ", interrupted" if busy.get("interrupted") else "", now["n"],
                        now["at"] - sent_at, now["at"] - busy["at"]))
        self.assertLess(now["at"] - busy["at"], 30)

        # 4. Nothing reached the model twice.
        time.sleep(3)
        self.assert_once("marker-idle", "marker-rt", "marker-now")
        self.assert_one_user_message("marker-idle", "marker-rt", "marker-now")
        self.report("no request shows the model a message twice "
                    "(%d model requests in all, %d in the conversation)" % (
                        self.api.count(), len(self.api.conversation())))
        self.report_channel_handshake()

    def test_hooks_without_the_inbox_socket(self):
        """Without the socket, UserPromptSubmit delivers on the next prompt, Stop before the end."""
        self.without_inbox_socket()
        self.launch()

        # A message to the idle session does not start a turn (no socket)...
        before = self.api.count()
        self.send("marker-hook-1: waiting for your next prompt")
        time.sleep(4)
        self.assertIsNone(self.request_with("marker-hook-1", after=before, last=False))
        # ... it comes with the next prompt, as context (Claude Code puts a
        # hook's context in the system prompt of that request).
        self.terminal.type("marker-prompt: hello")
        request = self.wait_request("marker-prompt")
        self.assertIn("marker-hook-1", claudecode.visible_text(request["body"]))
        self.report("UserPromptSubmit: the pending message came with the prompt "
                    "(model request #%d)" % (request["n"],))

        # A `now` message during a turn: the Stop hook makes Claude go on
        # with it before it stops.
        self.api.script("marker-stop-turn", claudecode.Answer(
            "thinking " + "more " * 20, seconds=8))
        self.terminal.type("marker-stop-turn: take your time")
        busy = self.wait_request("marker-stop-turn")
        self.send("marker-hook-2: read this before you stop", priority="now")
        after_stop = self.wait_request("marker-hook-2", after=busy["n"], last=False, timeout=60)
        self.report("Stop: blocked once with the pending message (model request #%d, %.2f s "
                    "after the busy turn began)" % (after_stop["n"],
                                                    after_stop["at"] - busy["at"]))
        time.sleep(4)
        self.assert_once("marker-hook-1", "marker-hook-2")
        self.assert_one_hook_answer("marker-hook-1", "marker-hook-2")
        self.report("no request shows the model a message twice (%d conversation requests)"
                    % (len(self.api.conversation()),))

    def test_channels_fall_back_to_initialize(self):
        """Channels opted in, no inbox socket: Claude Code opens the connection with initialize."""
        self.without_inbox_socket(CLAUDEMESH_CHANNELS="1")
        self.launch()
        lines = self.wait_for(lambda: self.debug_lines("Connection established with capabilities"),
                              timeout=TIMEOUT, what="the MCP handshake in the debug log")
        self.assertNotIn('"protocolEra":"modern"', lines[0])
        skipped = self.wait_for(lambda: self.debug_lines("Channel notifications"),
                                timeout=TIMEOUT, what="Claude Code's channel decision")
        # Offline, without a claude.ai sign-in, Claude Code says no to
        # channels for another reason than the protocol revision.
        self.assertNotIn("modern protocol revision", skipped[0])
        self.report("handshake: " + lines[0][lines[0].find("{"):][:200])
        self.report("Claude Code debug: " + skipped[0][-160:])

    def debug_lines(self, text):
        try:
            with open(self.debug_log, encoding="utf-8", errors="replace") as f:
                return [line.strip() for line in f if text in line and "claudemesh" in line]
        except OSError:
            return []

    # -- helpers -----------------------------------------------------------------------------

    def peer_inbox(self, text):
        result, error = self.peer.call("check_messages")
        self._peer_seen = getattr(self, "_peer_seen", "") + result
        return text if text in self._peer_seen else None

    def report(self, line):
        """
        A line of the test's own report (the closing note quotes it).
        """
        with open(os.path.join(os.environ.get("CLAUDEMESH_REAL_CLAUDE_REPORT",
                                              os.path.join(self.tmp, "report.txt"))), "a") as f:
            f.write("[%s] %s\n" % (self._testMethodName, line))

    def dump_requests(self, path):
        with open(path, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "at"} for r in self.api.requests],
                      f, indent=1)

    def report_channel_handshake(self):
        try:
            with open(self.debug_log, encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f if "hannel" in line and "claudemesh" in line]
        except OSError:
            lines = []
        for line in lines[:5]:
            self.report("Claude Code debug: " + line[-200:])
