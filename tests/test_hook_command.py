"""
C{claudemesh hook <status>} (L{claudemesh.cli.hook}): the request it signs,
its bounded stdin read, that it always exits 0 silently, that its import
path has no Twisted, Autobahn or MCP SDK, and how long it takes against a
broker that is not there. The broker side is a stdlib HTTP server in a
thread that records requests; the end-to-end case (a hook flipping an MCP
session's status) is in test_mcp_server.
"""

import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from claudemesh import crypto
from claudemesh.cli import hook
from tests.clientfixture import free_port
from tests.test_cli_commands import claudemesh_command
from tests.unixfixture import UnixSocketServer


def write_config(directory, meshes):
    """
    A config.json with one entry per C{(meshId, brokerUrl)}; returns the
    identities.
    """
    os.makedirs(directory, exist_ok=True)
    identities, entries = [], []
    for mesh_id, url in meshes:
        identity = crypto.Identity.generate()
        identities.append(identity)
        entries.append({"meshId": mesh_id, "memberId": "m-" + mesh_id, "slug": mesh_id,
                        "name": mesh_id, "pubkey": identity.pubkey,
                        "secretKey": identity.secret_hex, "brokerUrl": url,
                        "joinedAt": "2026-01-01T00:00:00.000Z"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"version": 1, "meshes": entries}, f)
    return identities


class Recorder(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append((self.path, dict(self.headers), body))
        reply = b'{"ok":true,"pending":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class RequestTests(SynchronousTestCase):
    """
    What the hook posts and how it reads its input.
    """

    def test_body_from_payload(self):
        """cwd and session_id come from the hook JSON; pid is the one given."""
        body = json.loads(hook.request_body("working", {"cwd": "/p", "session_id": "s1"}, {}, 42))
        self.assertEqual(body, {"cwd": "/p", "pid": 42, "status": "working", "session_id": "s1"})

    def test_body_fallbacks(self):
        """Fallbacks: $CLAUDE_PROJECT_DIR, $CLAUDEMESH_SESSION_ID; an overlong id is left out."""
        env = {"CLAUDE_PROJECT_DIR": "/proj", "CLAUDEMESH_SESSION_ID": "launched"}
        self.assertEqual(json.loads(hook.request_body("idle", {}, env, 7)),
                         {"cwd": "/proj", "pid": 7, "status": "idle", "session_id": "launched"})
        body = json.loads(hook.request_body("idle", {"session_id": "x" * 200}, {}, 7))
        self.assertNotIn("session_id", body)
        self.assertEqual(body["cwd"], os.getcwd())

    def test_stdin_is_bounded_in_size(self):
        """At most 256 KiB are read from stdin."""
        r, w = os.pipe()
        writer = threading.Thread(target=lambda: (os.write(w, b"x" * (300 * 1024)),
                                                  os.close(w)))
        writer.start()
        with os.fdopen(r, "rb") as stream:
            data = hook.read_stdin(stream)
        writer.join()
        self.assertEqual(len(data), hook.MAX_STDIN_BYTES)

    def test_stdin_is_bounded_in_time(self):
        """A stdin that never closes costs at most about half a second."""
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        os.write(w, b'{"cwd": "/x"}')
        started = time.monotonic()
        with os.fdopen(r, "rb") as stream:
            data = hook.read_stdin(stream)
        self.assertEqual(data, b'{"cwd": "/x"}')
        self.assertLess(time.monotonic() - started, 1.5)

    def test_bad_payloads(self):
        """Garbage, non-objects and bad UTF-8 on stdin are treated as no payload."""
        for raw in (b"", b"{nope", b"[1,2]", b"\xff\xfe", b"   "):
            self.assertEqual(hook.parse_payload(raw), {})


class SignedPostTests(SynchronousTestCase):
    """
    The requests reach the broker signed per docs/protocol.md, signed strings, one per mesh.
    """

    def setUp(self):
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
        self.server.requests = []
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.url = "ws://127.0.0.1:%d/ws" % (self.server.server_address[1],)
        self.dir = self.mktemp()

    def test_one_signed_request_per_mesh(self):
        """Each joined mesh gets POST /hook/set-status signed by its member key."""
        ids = write_config(self.dir, [("mesh-a", self.url), ("mesh-b", self.url)])
        env = {"CLAUDEMESH_CONFIG_DIR": self.dir}
        results = hook.report("dnd", {"cwd": "/w", "session_id": "abc"}, env, 99)
        self.assertEqual([(m, r[0]) for m, r in results], [("mesh-a", 200), ("mesh-b", 200)])
        self.assertEqual(len(self.server.requests), 2)
        by_mesh = {h["X-Claudemesh-Mesh"]: (p, h, b) for p, h, b in self.server.requests}
        for identity, mesh_id in zip(ids, ("mesh-a", "mesh-b")):
            path, headers, body = by_mesh[mesh_id]
            self.assertEqual(path, "/hook/set-status")
            self.assertEqual(headers["Content-Type"], "application/json")
            self.assertEqual(headers["X-Claudemesh-Pubkey"], identity.pubkey)
            timestamp = int(headers["X-Claudemesh-Timestamp"])
            self.assertLess(abs(timestamp - time.time() * 1000), 10000)
            self.assertTrue(crypto.verify(identity.pubkey,
                                          crypto.hook_string(mesh_id, timestamp, body),
                                          headers["X-Claudemesh-Signature"]))
            self.assertEqual(json.loads(body), {"cwd": "/w", "pid": 99, "status": "dnd",
                                                "session_id": "abc"})

    def test_main_posts_and_stays_silent(self):
        """main() posts the status, prints nothing and returns 0."""
        write_config(self.dir, [("m", self.url)])
        self.patch(hook, "read_stdin", lambda: b'{"cwd": "/c", "session_id": "s"}')
        self.assertEqual(hook.main(["working"], {"CLAUDEMESH_CONFIG_DIR": self.dir}), 0)
        self.assertEqual([json.loads(b)["status"] for _, _, b in self.server.requests],
                         ["working"])

    def test_ignored_statuses(self):
        """A missing or unknown status exits 0 without reading stdin or posting."""
        write_config(self.dir, [("m", self.url)])
        self.patch(hook, "read_stdin", lambda: self.fail("stdin read"))
        for argv in ([], ["busy"], ["Working"]):
            self.assertEqual(hook.main(argv, {"CLAUDEMESH_CONFIG_DIR": self.dir}), 0)
        self.assertEqual(self.server.requests, [])


class ProcessTests(SynchronousTestCase):
    """
    The hook as Claude Code runs it: a subprocess.
    """

    def setUp(self):
        self.dir = self.mktemp()
        self.dead = "ws://127.0.0.1:%d/ws" % (free_port(),)
        # No MCP server's local socket to find (the hook posts itself).
        self.runtime = tempfile.mkdtemp(prefix="cm-run-")
        self.addCleanup(shutil.rmtree, self.runtime, True)

    def env(self, **extra):
        env = dict(os.environ, CLAUDEMESH_CONFIG_DIR=self.dir,
                   CLAUDEMESH_RUNTIME_DIR=self.runtime)
        env.pop("CLAUDEMESH_HOOK_DEBUG", None)
        env.update(extra)
        return env

    def test_no_heavy_imports(self):
        """Running the hook entry imports no twisted, autobahn, mcp, mcp_types or attr."""
        write_config(self.dir, [("m", self.dead)])
        code = ("import sys\n"
                "from claudemesh.cli.main import main\n"
                "main(['hook', 'working'])\n"
                "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
                "('twisted', 'autobahn', 'mcp', 'mcp_types', 'attr', 'treq', 'txaio'))\n"
                "print(repr(heavy))\n")
        done = subprocess.run([sys.executable, "-c", code], input=b'{"cwd": "/x"}',
                              capture_output=True, env=self.env(), timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), b"[]")

    def test_unreachable_broker_fast_and_silent(self):
        """Against a closed port the hook exits 0, prints nothing, well under the time bound."""
        write_config(self.dir, [("m1", self.dead), ("m2", self.dead)])
        timings = []
        for _ in range(3):
            started = time.monotonic()
            done = subprocess.run(claudemesh_command() + ["hook", "working"],
                                  input=b'{"cwd": "/x", "session_id": "s"}',
                                  capture_output=True, env=self.env(), timeout=30)
            timings.append(time.monotonic() - started)
            self.assertEqual((done.returncode, done.stdout, done.stderr), (0, b"", b""))
        self.assertLess(min(timings), 1.5, timings)

    def test_silent_broker_is_bounded(self):
        """A broker that accepts but never answers costs about the 1 s request timeout."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        self.addCleanup(listener.close)
        write_config(self.dir, [("m", "ws://127.0.0.1:%d/ws" % (listener.getsockname()[1],))])
        started = time.monotonic()
        done = subprocess.run(claudemesh_command() + ["hook", "idle"], input=b"{}",
                              capture_output=True, env=self.env(), timeout=30)
        elapsed = time.monotonic() - started
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, b"", b""))
        self.assertLess(elapsed, hook.TOTAL_SECONDS + 2)

    def test_debug_goes_to_stderr(self):
        """CLAUDEMESH_HOOK_DEBUG=1 explains on stderr; stdout stays empty; exit 0."""
        write_config(self.dir, [("m1", self.dead)])
        done = subprocess.run(claudemesh_command() + ["hook", "working"], input=b"{}",
                              capture_output=True, env=self.env(CLAUDEMESH_HOOK_DEBUG="1"),
                              timeout=30)
        self.assertEqual((done.returncode, done.stdout), (0, b""))
        self.assertIn(b"[claudemesh hook] m1: ConnectionRefusedError", done.stderr)
        self.assertIn(b"done in", done.stderr)

    def test_broken_config_exit_0(self):
        """A corrupt config or none at all: exit 0, silent."""
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            f.write("{broken")
        for env in (self.env(), self.env(CLAUDEMESH_CONFIG_DIR=self.dir + "-none")):
            done = subprocess.run(claudemesh_command() + ["hook", "idle"], input=b"nonsense",
                                  capture_output=True, env=env, timeout=30)
            self.assertEqual((done.returncode, done.stdout, done.stderr), (0, b"", b""))


class ClaudeCodeParentTests(SynchronousTestCase):
    """
    Claude Code runs hook commands through /bin/sh -c: the hook still finds
    the MCP server of its Claude Code (here: this test process), with and
    without exec, and prints what that server answers.
    """

    def setUp(self):
        self.runtime = tempfile.mkdtemp(prefix="cm-run-")
        self.addCleanup(shutil.rmtree, self.runtime, True)
        output = {"hookSpecificOutput": {"hookEventName": "UserPromptSubmit",
                                         "additionalContext": "bob: hi"}}
        self.server = UnixSocketServer(os.path.join(self.runtime, "cc-%d.sock" % (os.getpid(),)),
                                      {"output": output})
        self.addCleanup(self.server.close)
        self.output = output

    def run_through_shell(self, command):
        env = dict(os.environ, CLAUDEMESH_RUNTIME_DIR=self.runtime,
                   CLAUDEMESH_CONFIG_DIR=os.path.join(self.runtime, "none"))
        payload = {"hook_event_name": "UserPromptSubmit", "session_id": "s1", "prompt": "x"}
        return subprocess.run(["/bin/sh", "-c", command], input=json.dumps(payload).encode(),
                              capture_output=True, env=env, timeout=30)

    def check(self, command):
        done = self.run_through_shell(command)
        self.assertEqual((done.returncode, done.stderr), (0, b""))
        self.assertEqual(json.loads(done.stdout), self.output)
        request = self.server.requests[-1]
        self.assertEqual((request["op"], request["event"], request["status"],
                          request["payload"]["session_id"]),
                         ("hook", "UserPromptSubmit", "working", "s1"))

    def test_with_exec(self):
        """'exec claudemesh hook working' (what install writes): the parent is Claude Code."""
        self.check("exec " + " ".join(shlex.quote(a) for a in claudemesh_command())
                   + " hook working")

    def test_without_exec(self):
        """An older install without exec: the hook looks past the shell to its parent."""
        # A second command keeps sh from exec-ing the last one by itself.
        self.check(" ".join(shlex.quote(a) for a in claudemesh_command())
                   + " hook working; true")
