"""
C{claudemesh} commands as subprocesses against a real broker
(C{twistd -n claudemesh-broker}) on a free port of 127.0.0.1, with a temporary
data directory and one temporary config directory per identity. Asserts
output and exit codes. Each test has its own broker, stopped after it.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from tests.clientfixture import free_port

_names = itertools.count(1)


def claudemesh_command():
    script = os.path.join(os.path.dirname(sys.executable), "claudemesh")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "claudemesh.cli.main"]


def twistd_command():
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class CLIBrokerFixture(SynchronousTestCase):
    """
    A broker subprocess per test and helpers to run C{claudemesh} as
    several people against it (no tests of its own).
    """

    broker_args = ()

    def start_broker(self):
        cls = self
        cls.tmp = tempfile.mkdtemp(prefix="claudemesh-cli-")
        cls.port = free_port()
        cls.url = "ws://127.0.0.1:%d/ws" % (cls.port,)
        cls.log = open(os.path.join(cls.tmp, "broker.log"), "wb")
        cls.broker = subprocess.Popen(
            twistd_command() + ["-n", "--pidfile=", "claudemesh-broker",
                                "--port", "tcp:%d:interface=127.0.0.1" % (cls.port,),
                                "--data-dir", os.path.join(cls.tmp, "data")]
            + list(getattr(self, "broker_args", ())),
            cwd=cls.tmp, stdout=cls.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/health/ready" % (cls.port,),
                                       timeout=1).read()
                break
            except Exception:
                if cls.broker.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the broker did not start")
                time.sleep(0.1)

    def stop_broker(self):
        cls = self
        if cls.broker.poll() is None:
            cls.broker.send_signal(signal.SIGTERM)
            try:
                cls.broker.wait(10)
            except subprocess.TimeoutExpired:
                cls.broker.kill()
                cls.broker.wait()
        cls.log.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def env(self, who):
        env = dict(os.environ)
        env.pop("CLAUDEMESH_DISPLAY_NAME", None)
        env.pop("CLAUDEMESH_ADMIN_TOKEN", None)
        env["CLAUDEMESH_CONFIG_DIR"] = os.path.join(self.dir, who)
        env["CLAUDEMESH_BROKER_URL"] = self.url
        return env

    def setUp(self):
        self.addCleanup(self.stop_broker)
        self.start_broker()
        self.dir = os.path.join(self.tmp, "t%d" % (next(_names),))
        self.mesh = "mesh%d" % (next(_names),)
        self.listeners = []
        self.addCleanup(self.stop_listeners)

    def stop_listeners(self):
        for p in self.listeners:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for stream in (p.stdout, p.stderr):
                stream.close()

    def cm(self, who, *args, timeout=30, stdin=None, env=None):
        """
        Run one command as C{who}; returns C{(exit code, stdout, stderr)}.
        """
        done = subprocess.run(claudemesh_command() + list(args),
                              env=dict(self.env(who), **(env or {})), input=stdin,
                              capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout, done.stderr

    def ok(self, who, *args):
        code, out, err = self.cm(who, *args)
        self.assertEqual(code, 0, (args, out, err))
        return out

    def mesh_with(self, *names):
        """
        A new mesh owned by 'owner' with members C{names} joined by invite.
        """
        self.ok("owner", "new", self.mesh, "--name", "owner")
        for name in names:
            link = json.loads(self.ok("owner", "invite", "--json"))["link"]
            self.ok(name, "join", link, "--name", name)

    def listen(self, who):
        """
        Start 'listen --json' as C{who}; returns the process once it listens.
        """
        p = subprocess.Popen(claudemesh_command() + ["listen", "--json"], env=self.env(who),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.listeners.append(p)
        deadline = time.time() + 15
        while time.time() < deadline:
            code, out, _ = self.cm("owner", "peers", "--json")
            if any(peer["displayName"] == who for peer in json.loads(out)):
                return p
            time.sleep(0.2)
        raise AssertionError("listen did not connect")


class CLIAgainstBrokerTests(CLIBrokerFixture):
    """
    new / invite / join / send / inbox / listen / moderation from a shell.
    """

    def test_new_invite_join_send_inbox(self):
        """A DM from the owner reaches a member's inbox; exit codes are 0."""
        out = self.ok("owner", "new", self.mesh, "--name", "owner")
        self.assertIn('Created mesh "%s"' % (self.mesh,), out)
        invite = json.loads(self.ok("owner", "invite", "--json"))
        self.assertTrue(invite["link"].startswith("claudemesh://join/"))
        self.assertIn("#", invite["link"])
        out = self.ok("alice", "join", invite["link"], "--name", "alice")
        self.assertIn('Joined "%s" as alice (member)' % (self.mesh,), out)
        out = self.ok("owner", "send", "alice", "hello", "alice")
        self.assertTrue(out.startswith("Queued for alice — not connected now"), out)
        messages = json.loads(self.ok("alice", "inbox", "--json", "--wait", "1"))
        self.assertEqual([(m["text"], m["senderName"]) for m in messages],
                         [("hello alice", "owner")])
        out = self.ok("alice", "inbox", "--wait", "0.5")
        self.assertIn('No messages on mesh "%s".' % (self.mesh,), out)

    def test_peer_text_cannot_drive_the_terminal(self):
        """
        Escape sequences and carriage returns in a peer's message (or name)
        reach the terminal made visible: a member cannot clear another's
        screen, retitle it, or overwrite a line with a fake one.
        """
        self.mesh_with("alice")
        self.ok("owner", "send", "alice", "hi \x1b[2J\x1b]0;pwned\x07\rfake\x9b1m")
        out = self.ok("alice", "inbox", "--wait", "1")
        self.assertIn("hi \\x1b[2J\\x1b]0;pwned\\x07\\x0dfake\\x9b1m", out)
        for control in ("\x1b", "\x07", "\r", "\x9b"):
            self.assertNotIn(control, out)

    def test_invite_used_up(self):
        """A one-use invite refuses a second joiner with a non-zero exit."""
        self.ok("owner", "new", self.mesh, "--name", "owner")
        link = json.loads(self.ok("owner", "invite", "--json"))["link"]
        self.ok("alice", "join", link, "--name", "alice")
        code, _, err = self.cm("bob", "join", link, "--name", "bob")
        self.assertEqual(code, 1)
        self.assertIn("invite_exhausted", err)

    def test_listen_broadcast_and_status(self):
        """listen --json prints a broadcast as one JSON line; status and summary show in peers."""
        self.mesh_with("alice")
        listener = self.listen("alice")
        self.ok("owner", "send", "*", "to everyone")
        line = listener.stdout.readline()
        self.assertEqual(json.loads(line)["text"], "to everyone")
        self.ok("alice", "status", "working")
        self.ok("alice", "summary", "writing", "tests")
        peers = json.loads(self.ok("owner", "peers", "--json"))
        alice = [p for p in peers if p["displayName"] == "alice"]
        self.assertEqual([(p["status"], p["summary"]) for p in alice],
                         [("working", "writing tests")])

    def test_kick_ends_listener(self):
        """kick prints the count and hint; the kicked listener exits 1 with the 4001 text."""
        self.mesh_with("alice")
        listener = self.listen("alice")
        code, out, err = self.cm("owner", "kick", "alice")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "Kicked 1 peer(s): alice\n"
                              "They can rejoin anytime by running claudemesh.\n")
        self.assertEqual(listener.wait(15), 1)
        self.assertIn("Kicked from this mesh. Run claudemesh to rejoin.", listener.stderr.read())

    def test_disconnect_prints_hint(self):
        """disconnect prints the count and the auto-reconnect hint."""
        self.mesh_with("alice")
        self.listen("alice")
        code, out, err = self.cm("owner", "disconnect", "alice")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "Disconnected 1 peer(s): alice\n"
                              "They will auto-reconnect within seconds.\n")

    def test_ban_then_revoked(self):
        """A banned member's next command prints the revoked message and exits 1."""
        self.mesh_with("alice")
        self.ok("owner", "ban", "alice")
        code, _, err = self.cm("alice", "peers")
        self.assertEqual(code, 1)
        self.assertIn('You\'ve been removed from "%s". Contact the mesh owner to rejoin.'
                      % (self.mesh,), err)
        bans = json.loads(self.ok("owner", "bans", "--json"))
        self.assertEqual([b["name"] for b in bans], ["alice"])
        self.ok("owner", "unban", "alice")
        self.ok("alice", "peers")

    def test_refusals_are_errors(self):
        """A member's kick is 'forbidden' (exit 7); an unknown target exits 5."""
        self.mesh_with("alice")
        code, out, err = self.cm("alice", "kick", "owner")
        self.assertEqual(code, 7)
        self.assertNotIn("No peers matched", out + err)
        self.assertIn("forbidden", err)
        code, _, err = self.cm("owner", "send", "nobody", "hi")
        self.assertEqual(code, 5)
        code, _, err = self.cm("owner", "kick", "nobody")
        self.assertEqual(code, 5)

    def test_role_and_audit(self):
        """role makes an admin; audit --verify reports a valid chain."""
        self.mesh_with("alice")
        out = self.ok("owner", "role", "alice", "admin")
        self.assertIn("alice is now admin", out)
        verify = json.loads(self.ok("owner", "audit", "--verify", "--json"))
        self.assertTrue(verify["valid"])

    def test_leave(self):
        """leave removes the membership and the local entry."""
        self.mesh_with("alice")
        self.assertIn("Left", self.ok("alice", "leave"))
        self.assertEqual(json.loads(self.ok("alice", "list", "--json")), [])

    def test_unreachable_broker_exit_4(self):
        """A broker that is not there: exit 4 with a clear message, quickly."""
        dead = "ws://127.0.0.1:%d/ws" % (free_port(),)
        started = time.time()
        code, _, err = self.cm("owner", "new", "x", "--broker", dead)
        self.assertEqual(code, 4)
        self.assertIn("Cannot reach the broker", err)
        self.mesh_with()
        path = os.path.join(self.dir, "owner", "config.json")
        document = json.load(open(path))
        document["meshes"][0]["brokerUrl"] = dead
        with open(path, "w") as f:
            json.dump(document, f)
        code, _, err = self.cm("owner", "peers")
        self.assertEqual(code, 4)
        self.assertIn("Cannot reach the broker", err)
        self.assertNotIn("Traceback", err)
        self.assertLess(time.time() - started, 20)

    def test_bad_link_exit_3(self):
        """join with something that is not an invite link exits 3."""
        code, _, err = self.cm("alice", "join", "https://example.com/nothing")
        self.assertEqual(code, 3)
        self.assertIn("invite", err)
