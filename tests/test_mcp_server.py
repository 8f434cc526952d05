"""
C{claudemesh mcp} as Claude Code runs it: subprocesses speaking raw JSON-RPC
on stdin/stdout, against a real broker (C{twistd -n claudemesh-broker} on a
free port of 127.0.0.1), with members made by the CLI's own C{new} /
C{invite} / C{join} in separate config directories. The client here reads
the raw stream because the SDK's client drops unknown notifications such as
C{notifications/claude/channel}.

These are integration tests: every broker and MCP process is stopped and
every temporary directory removed after each test.
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid

from twisted.trial.unittest import SynchronousTestCase

from tests.clientfixture import free_port
from tests.test_cli_commands import claudemesh_command, twistd_command
from tests.unixfixture import UnixSocketServer

KICKED = "Kicked from this mesh. Run claudemesh to rejoin."


class RawMCPClient:
    """
    A JSON-RPC client over a C{claudemesh mcp} subprocess's stdio that keeps
    every notification it reads.
    """

    def __init__(self, env, cwd, stderr_path):
        self.stderr = open(stderr_path, "wb")
        self.process = subprocess.Popen(
            claudemesh_command() + ["mcp"], env=env, cwd=cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr)
        self.lines = queue.Queue()
        self.notifications = []
        self.garbage = []
        self.ids = iter(range(1, 10**6))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, message):
        self.process.stdin.write(json.dumps(message).encode("utf-8") + b"\n")
        self.process.stdin.flush()

    def _next(self, deadline):
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError("no answer from the MCP server in time")
        try:
            line = self.lines.get(timeout=left)
        except queue.Empty:
            raise AssertionError("no answer from the MCP server in time") from None
        if line is None:
            raise AssertionError("the MCP server closed its stdout")
        try:
            return json.loads(line)
        except ValueError:
            self.garbage.append(line)
            raise AssertionError("not JSON on stdout: %r" % (line,)) from None

    def request(self, method, params=None, timeout=30):
        request_id = next(self.ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        deadline = time.time() + timeout
        while True:
            message = self._next(deadline)
            if message.get("id") == request_id and "method" not in message:
                return message
            if "method" in message and "id" not in message:
                self.notifications.append(message)

    def initialize(self):
        reply = self.request("initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw-test-client", "version": "0"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply["result"]

    def call(self, tool, **arguments):
        """
        Call a tool; returns C{(text, isError)}.
        """
        reply = self.request("tools/call", {"name": tool, "arguments": arguments})
        result = reply["result"]
        return "".join(c.get("text", "") for c in result["content"]), result.get("isError")

    def wait_notification(self, predicate, timeout=20):
        deadline = time.time() + timeout
        while True:
            for n in self.notifications:
                if predicate(n):
                    return n
            message = self._next(deadline)
            if "method" in message and "id" not in message:
                self.notifications.append(message)

    def close(self, timeout=15):
        """
        Close stdin and wait for the process; returns its exit code.
        """
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process.stdout.close()
            self.stderr.close()


class BrokerProcessMixin:
    """
    A twistd broker per test and CLI helpers, as in test_cli_commands.
    """

    def start_broker(self):
        self.tmp = tempfile.mkdtemp(prefix="claudemesh-mcp-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.port = free_port()
        self.url = "ws://127.0.0.1:%d/ws" % (self.port,)
        log = open(os.path.join(self.tmp, "broker.log"), "wb")
        self.addCleanup(log.close)
        broker = subprocess.Popen(
            twistd_command() + ["-n", "--pidfile=", "claudemesh-broker",
                                "--port", "tcp:%d:interface=127.0.0.1" % (self.port,),
                                "--data-dir", os.path.join(self.tmp, "data")],
            cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(self.stop_process, broker)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/health/ready" % (self.port,),
                                       timeout=1).read()
                return
            except Exception:
                if broker.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the broker did not start")
                time.sleep(0.1)

    def stop_process(self, process):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def env(self, who, **extra):
        env = dict(os.environ)
        for key in ("CLAUDEMESH_DISPLAY_NAME", "CLAUDEMESH_ADMIN_TOKEN", "CLAUDEMESH_SESSION_ID",
                    "CLAUDEMESH_MESH", "CLAUDEMESH_MESSAGE_MODE", "CLAUDE_PROJECT_DIR",
                    "CLAUDEMESH_CHANNELS", "CLAUDE_CODE_MESSAGING_SOCKET",
                    "CLAUDE_CODE_MESSAGING_TOKEN", "CLAUDE_CODE_USE_BEDROCK",
                    "CLAUDE_CODE_USE_VERTEX", "CLAUDE_CODE_USE_FOUNDRY"):
            env.pop(key, None)
        # Every MCP server of these tests has the test as its parent (the
        # "Claude Code" that the local sockets are named after): one
        # runtime directory per member keeps theirs apart.
        env["CLAUDEMESH_RUNTIME_DIR"] = os.path.join(self.tmp, who, "run")
        env["CLAUDEMESH_CONFIG_DIR"] = os.path.join(self.tmp, who, "config")
        env["HOME"] = os.path.join(self.tmp, who, "home")
        os.makedirs(env["HOME"], exist_ok=True)
        env["CLAUDEMESH_BROKER_URL"] = self.url
        env.update(extra)
        return env

    def cm(self, who, *args, stdin=None, env=None, timeout=30):
        done = subprocess.run(claudemesh_command() + list(args), env=env or self.env(who),
                              input=stdin, capture_output=True, timeout=timeout)
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    def ok(self, who, *args):
        code, out, err = self.cm(who, *args)
        self.assertEqual(code, 0, (args, out, err))
        return out

    def mesh_with(self, *names):
        self.ok("owner", "new", "team", "--name", "owner")
        for name in names:
            link = json.loads(self.ok("owner", "invite", "--json"))["link"]
            self.ok(name, "join", link, "--name", name)

    def mcp(self, who, session_id=None, **extra):
        """
        Start C{claudemesh mcp} as C{who} (a launched session when
        C{session_id} is given, C{extra} in its environment) and initialize
        it.
        """
        if session_id:
            extra["CLAUDEMESH_SESSION_ID"] = session_id
        workdir = os.path.join(self.tmp, who, "work")
        os.makedirs(workdir, exist_ok=True)
        client = RawMCPClient(self.env(who, **extra), workdir,
                              os.path.join(self.tmp, "%s-mcp.log" % (who,)))
        self.addCleanup(client.close)
        client.workdir = workdir
        client.init = client.initialize()
        return client

    def wait_for(self, check, timeout=20, what="condition"):
        deadline = time.time() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError("timed out waiting for " + what)
            time.sleep(0.3)


class MCPAgainstBrokerTests(BrokerProcessMixin, SynchronousTestCase):
    """
    Two Claude Code sessions (their MCP servers) on one mesh.
    """

    def setUp(self):
        self.start_broker()
        self.mesh_with("alice")
        self.alice_session = str(uuid.uuid4())
        # Channels on: no inbox socket here, so they are the live path.
        self.alice = self.mcp("alice", self.alice_session, CLAUDEMESH_CHANNELS="1")
        self.owner = self.mcp("owner", str(uuid.uuid4()))
        self.wait_for(lambda: self.peer_line("alice"), what="alice online")

    def peer_line(self, name, via=None):
        text, error = (via or self.owner).call("list_peers")
        if error:
            return None
        for line in text.splitlines():
            if line.startswith("- **%s**" % (name,)):
                return line
        return None

    def test_initialize_declares_channel(self):
        """initialize declares experimental claude/channel and the tools; stdout is only JSON."""
        self.assertEqual(self.alice.init["capabilities"]["experimental"],
                         {"claude/channel": {}})
        self.assertEqual(self.alice.init["serverInfo"]["name"], "claudemesh")
        tools = self.alice.request("tools/list")["result"]["tools"]
        self.assertEqual(
            sorted(t["name"] for t in tools),
            sorted(["send_message", "list_peers", "check_messages", "set_status",
                    "set_summary", "join_group", "leave_group", "message_status",
                    "mesh_info"]))
        self.assertEqual(self.alice.garbage, [])

    def test_send_receive_channel_and_check_messages(self):
        """With channels on, a message reaches the other session as one channel notification."""
        text, error = self.owner.call("send_message", to="alice", message="hello from owner")
        self.assertFalse(error, text)
        self.assertTrue(text.startswith("✓ alice → "), text)
        note = self.alice.wait_notification(
            lambda n: n["method"] == "notifications/claude/channel"
            and n["params"]["meta"].get("kind") == "direct")
        params = note["params"]
        self.assertEqual(params["content"], "owner: hello from owner")
        meta = params["meta"]
        self.assertTrue(all(isinstance(v, str) for v in meta.values()), meta)
        self.assertEqual((meta["from_name"], meta["mesh_slug"], meta["priority"]),
                         ("owner", "team", "next"))
        self.assertEqual(meta["message_id"], text.split("→ ")[1].strip())
        # It reached the model: check_messages does not give it again.
        self.assertEqual(self.alice.call("check_messages"), ("No new messages.", False))
        status, _ = self.owner.call("message_status", id=meta["message_id"])
        self.assertIn("alice", status)
        self.assertIn("delivered", status)

    def test_hook_flips_status(self):
        """claudemesh hook working/idle with the session id flips its status in list_peers."""
        self.assertIn("[idle]", self.peer_line("alice"))
        payload = json.dumps({"cwd": "/not/the/mcp/cwd", "session_id": self.alice_session})
        code, out, err = self.cm("alice", "hook", "working", stdin=payload.encode())
        self.assertEqual((code, out, err), (0, "", ""))
        self.wait_for(lambda: "[working]" in self.peer_line("alice"), what="working")
        code, out, err = self.cm("alice", "hook", "idle", stdin=payload.encode())
        self.assertEqual((code, out, err), (0, "", ""))
        self.wait_for(lambda: "[idle]" in self.peer_line("alice"), what="idle")

    def test_kicked_session_tools_say_so(self):
        """After a kick (4001) every tool of that MCP session returns the kicked message."""
        self.ok("owner", "kick", "alice")
        self.wait_for(lambda: self.alice.call("list_peers")[0] == KICKED, what="kicked")
        for tool, arguments in (("send_message", {"to": "owner", "message": "hi"}),
                                ("check_messages", {}), ("set_status", {"status": "dnd"}),
                                ("mesh_info", {})):
            self.assertEqual(self.alice.call(tool, **arguments), (KICKED, True), tool)
        note = self.alice.wait_notification(
            lambda n: n["params"]["meta"].get("event") == "session_ended")
        self.assertEqual(note["params"]["content"], "[system] " + KICKED)
        # The owner's session is untouched.
        self.assertFalse(self.owner.call("list_peers")[1])

    def test_stdin_close_exits_and_leaves(self):
        """Closing stdin ends the server with 0 and its session leaves the mesh at once."""
        self.assertEqual(self.alice.close(), 0)
        self.wait_for(lambda: self.peer_line("alice") is None, timeout=10, what="alice gone")

    def test_two_sessions_one_directory(self):
        """Two unlaunched sessions of one member in one directory both stay (no eviction)."""
        self.mcp("alice")
        self.mcp("alice")

        def alice_lines():
            text, error = self.owner.call("list_peers")
            return [] if error else [line for line in text.splitlines()
                                     if line.startswith("- **alice**")]

        self.wait_for(lambda: len(alice_lines()) == 3, what="three alice sessions")
        time.sleep(2)
        self.assertEqual(len(alice_lines()), 3)
        # The launched session's key is kept on disk; the others' are not.
        sessions = os.path.join(self.tmp, "alice", "config", "sessions", "team")
        self.assertEqual(os.listdir(sessions), [self.alice_session + ".json"])

    def test_transcript_drives_status(self):
        """A tool_use as the last assistant entry of the session's transcript shows as working."""
        from claudemesh.mcpserver.transcript import project_keys

        folder = os.path.join(self.tmp, "alice", "home", ".claude", "projects",
                              project_keys(self.alice.workdir)[0])
        os.makedirs(folder)
        path = os.path.join(folder, self.alice_session + ".jsonl")

        def write(*content):
            with open(path, "w") as f:
                f.write(json.dumps({"type": "user", "message": {"content": "go"}}) + "\n")
                f.write(json.dumps({"type": "assistant",
                                    "message": {"content": list(content)}}) + "\n")

        write({"type": "tool_use", "id": "t", "name": "Bash", "input": {}})
        self.wait_for(lambda: "[working]" in self.peer_line("alice"), what="working")
        write({"type": "text", "text": "done"})
        self.wait_for(lambda: "[idle]" in self.peer_line("alice"), what="idle")


class DeliveryPathsAgainstBrokerTests(BrokerProcessMixin, SynchronousTestCase):
    """
    The inbox socket and the hook fallbacks with real MCP servers, a real
    broker and the real hook and statusline commands.
    """

    def setUp(self):
        self.start_broker()
        self.mesh_with("alice")
        self.alice_session = str(uuid.uuid4())
        self.owner = self.mcp("owner", str(uuid.uuid4()))

    def start_alice(self, **extra):
        self.alice = self.mcp("alice", self.alice_session, **extra)
        self.wait_for(lambda: "alice" in self.owner.call("list_peers")[0], what="alice online")

    def hook(self, status, event, **payload):
        payload.update(hook_event_name=event, session_id=self.alice_session, cwd="/w")
        code, out, err = self.cm("alice", "hook", status, stdin=json.dumps(payload).encode())
        self.assertEqual((code, err), (0, ""))
        return json.loads(out) if out.strip() else None

    def test_inbox_socket(self):
        """A DM goes into the session's inbox socket (auth line first), whole and once."""
        inbox = UnixSocketServer(os.path.join(self.tmp, "inbox.sock"))
        self.addCleanup(inbox.close)
        self.start_alice(CLAUDE_CODE_MESSAGING_SOCKET=inbox.path,
                         CLAUDE_CODE_MESSAGING_TOKEN="secret-token")
        text, error = self.owner.call("send_message", to="alice", message="build is green",
                                      priority="now")
        self.assertFalse(error, text)
        message_id = text.split("→ ")[1].strip()
        self.wait_for(lambda: inbox.received, what="the inbox socket")
        [data] = inbox.received
        auth, line, rest = data.split(b"\n")
        self.assertEqual(json.loads(auth), {"type": "auth", "token": "secret-token"})
        message = json.loads(line)
        self.assertEqual((message["type"], message["priority"], message["message"]["role"]),
                         ("user", "now", "user"))
        self.assertIn("Message from owner on mesh team", message["message"]["content"])
        self.assertIn("build is green", message["message"]["content"])
        self.assertIn('to="owner"', message["message"]["content"])
        self.assertEqual(rest, b"")
        self.assertEqual(self.alice.call("check_messages"), ("No new messages.", False))
        self.assertIsNone(self.hook("working", "UserPromptSubmit"))
        self.wait_for(lambda: "delivered" in self.owner.call("message_status", id=message_id)[0],
                      what="acknowledged")
        self.assertEqual(len(inbox.received), 1)

    def test_refused_inbox_uses_the_hooks(self):
        """With crossSessionInbound 'refuse' the socket is left alone; the next prompt delivers."""
        inbox = UnixSocketServer(os.path.join(self.tmp, "inbox.sock"))
        self.addCleanup(inbox.close)
        settings = os.path.join(self.tmp, "alice", "home", ".claude", "settings.json")
        os.makedirs(os.path.dirname(settings), exist_ok=True)
        with open(settings, "w") as f:
            json.dump({"crossSessionInbound": "refuse"}, f)
        self.start_alice(CLAUDE_CODE_MESSAGING_SOCKET=inbox.path)
        self.owner.call("send_message", to="alice", message="not through the inbox")
        self.wait_for(lambda: "✉ 1" in self.cm("alice", "statusline")[1], what="pending")
        output = self.hook("working", "UserPromptSubmit", prompt="hi")
        self.assertIn("not through the inbox", output["hookSpecificOutput"]["additionalContext"])
        self.assertEqual(inbox.received, [])

    def test_hooks_when_the_socket_is_gone(self):
        """A socket nobody listens on: the next prompt's hook delivers, once; Stop blocks once."""
        self.start_alice(CLAUDE_CODE_MESSAGING_SOCKET=os.path.join(self.tmp, "gone.sock"))
        self.owner.call("send_message", to="alice", message="first one")
        self.wait_for(lambda: "✉ 1" in self.cm("alice", "statusline")[1], what="pending")
        output = self.hook("working", "UserPromptSubmit", prompt="hi")
        context = output["hookSpecificOutput"]["additionalContext"]
        self.assertEqual(output["hookSpecificOutput"]["hookEventName"], "UserPromptSubmit")
        self.assertIn("first one", context)
        self.assertIsNone(self.hook("working", "UserPromptSubmit", prompt="again"))
        self.wait_for(lambda: "[working]" in (self.peer_line("alice") or ""), what="working")

        self.owner.call("send_message", to="alice", message="before you stop", priority="now")
        self.wait_for(lambda: "✉ 1" in self.cm("alice", "statusline")[1], what="pending")
        self.assertIsNone(self.hook("idle", "Stop", stop_hook_active=True))
        output = self.hook("idle", "Stop", stop_hook_active=False)
        self.assertEqual(output["decision"], "block")
        self.assertIn("before you stop", output["reason"])
        self.assertIsNone(self.hook("idle", "Stop", stop_hook_active=False))
        self.assertEqual(self.alice.call("check_messages"), ("No new messages.", False))
        self.assertEqual(self.cm("alice", "statusline")[1], "team · 1 online · ✉ 0\n")

    def test_session_start_and_no_server(self):
        """SessionStart names the mesh and who is online; without an MCP server the config does."""
        self.start_alice()
        output = self.hook("idle", "SessionStart", source="startup")
        context = output["hookSpecificOutput"]["additionalContext"]
        self.assertIn('You are "alice" on mesh team; online: owner [idle]', context)
        self.assertEqual(self.alice.close(), 0)
        output = self.hook("idle", "SessionStart", source="startup")
        self.assertIn('this session is on mesh team as "alice"',
                      output["hookSpecificOutput"]["additionalContext"])
        self.assertEqual(self.cm("alice", "statusline")[1], "team · offline\n")

    def peer_line(self, name):
        text, error = self.owner.call("list_peers")
        for line in text.splitlines():
            if line.startswith("- **%s**" % (name,)):
                return line
        return None
