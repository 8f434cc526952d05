"""
The broker side of issue 13 (a newcomer's first hour).

Core rules on a memory store and a fake clock: C{maxMessageBytes} in
C{hello_ack}, no presence for C{presence:false} sessions, honest kick and
send replies, groups for all of a member's sessions, signed invites with a
mesh key check. Start-up as an operator meets it, as subprocesses: a
Postgres database created after the broker started, C{make run PORT=},
C{twistd claudemesh-broker --version}. And the MCP C{send_message} tool's
answer to a message that is too large, against a real broker.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import psycopg2.extensions
from twisted.internet import defer, task
from twisted.internet import reactor as global_reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudemesh import __version__, crypto
from claudemesh.client import connection
from claudemesh.invite import encode_token, sign_invite
from claudemesh.mcpserver import bridge
from claudemesh.protocol import Refusal
from tests import pg
from tests.clientfixture import InProcessBroker, free_port
from tests.meshfixture import BrokerFixture
from tests.test_cli_commands import claudemesh_command, twistd_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CoreTests(SynchronousTestCase):
    """
    The broker core's part of the newcomer fixes.
    """

    def setUp(self):
        self.fixture = BrokerFixture(max_message_bytes=4096)
        self.owner = self.fixture.create_mesh()
        self.alice = self.fixture.add_member(self.owner, "alice")
        self.bob = self.fixture.add_member(self.owner, "bob")

    def test_hello_ack_announces_the_limit(self):
        """hello_ack carries maxMessageBytes; without a limit (0) it is absent."""
        self.assertEqual(self.alice.connect()["maxMessageBytes"], 4096)
        fixture = BrokerFixture(max_message_bytes=0)
        owner = fixture.create_mesh()
        self.assertNotIn("maxMessageBytes", owner.connect())

    def test_quiet_session_makes_no_presence(self):
        """A presence:false session receives, but nobody sees it come, go or in peers_list."""
        self.alice.connect(session_id="listen")
        self.bob.connect(session_id="inbox", presence=False)
        self.bob.leave()
        self.assertEqual(self.alice.connection.events(), [])
        self.bob.connect(session_id="inbox2", presence=False)
        names = [p["displayName"] for p in self.alice.request({"type": "list_peers"})["peers"]]
        self.assertEqual(names, ["alice"])
        self.alice.send(self.bob.pubkey, b"for the inbox")
        self.assertEqual(len(self.bob.connection.messages()), 1)

    def test_kick_reply_says_who_was_connected(self):
        """kick_ack lists each session with online, and skips one-shot sessions."""
        self.owner.connect(session_id="owner-cli", receive=False)
        self.alice.connect(session_id="a1")
        self.alice.drop()
        self.bob.connect(session_id="b1")
        self.bob.connect(session_id="b-cli", receive=False)
        reply = self.owner.request({"type": "kick", "all": True})
        self.assertEqual([(s["name"], s["sessionId"], s["online"]) for s in reply["sessions"]],
                         [("alice", "a1", False), ("bob", "b1", True)])
        self.assertEqual(reply["affected"], ["alice", "bob"])

    def test_ack_counts_recipients(self):
        """ack says how many recipients and how many a live session took at once."""
        self.alice.connect(session_id="a1")
        self.bob.connect(session_id="b1")
        self.bob.request({"type": "set_status", "status": "dnd"})
        self.owner.connect(session_id="o1", receive=False)
        ack = self.owner.send("*")
        self.assertEqual((ack["recipients"], ack["pushed"]), (2, 1))
        ack = self.owner.send("@nobody-here")
        self.assertEqual((ack["queued"], ack["recipients"], ack["pushed"]), (True, 0, 0))
        ack = self.owner.send(self.bob.pubkey, priority="now")
        self.assertEqual((ack["recipients"], ack["pushed"]), (1, 1))

    def test_join_group_for_all_sessions(self):
        """join_group all:true puts every session of the member in the group; leave takes it out."""
        self.alice.connect(session_id="a1")
        first = self.alice.session
        self.alice.connect(session_id="a-cli", receive=False)
        self.alice.request({"type": "join_group", "name": "devs", "all": True})
        self.assertIn("devs", first.groups)
        self.alice.request({"type": "leave_group", "name": "devs", "all": True})
        self.assertNotIn("devs", first.groups)
        refused = self.alice.request({"type": "join_group", "name": "devs",
                                      "sessionId": "not-mine"})
        self.assertIsInstance(refused, Refusal)

    def test_join_with_checked_invite(self):
        """An invite with meshKeyCheck joins; one whose check value was swapped does not."""
        self.owner.connect(session_id="o1")
        created = self.owner.request({"type": "create_invite", "expiresIn": 3600})
        check = crypto.mesh_key_check(crypto.new_mesh_key(), self.owner.mesh.id)
        invite = sign_invite(self.owner.identity, self.owner.mesh.id, "team",
                             created["inviteId"], "member", created["expiresAt"],
                             "ws://h/ws", check)
        joiner = crypto.Identity.generate()

        def join(token):
            now = self.fixture.now_ms()
            d = self.fixture.broker.membership.join(_JoinFrame(
                token, joiner.pubkey, "carol", now,
                joiner.sign(crypto.join_string(created["inviteId"], joiner.pubkey, "carol",
                                               now))))
            results = []
            d.addBoth(results.append)
            self.fixture.flush()
            return results[0]

        swapped = dict(invite, meshKeyCheck="0" * 32)
        refused = join(encode_token(swapped))
        self.assertEqual(refused.value.code, "invite_bad_signature")
        self.assertEqual(join(encode_token(invite))["role"], "member")


class _JoinFrame:
    def __init__(self, invite, pubkey, display_name, timestamp, signature):
        self.invite, self.pubkey, self.displayName = invite, pubkey, display_name
        self.timestamp, self.signature = timestamp, signature


class BrokerStartupTests(SynchronousTestCase):
    """
    twistd claudemesh-broker as an operator starts it.
    """

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="claudemesh-startup-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.processes = []
        self.addCleanup(self.stop_all)

    def stop_all(self):
        for p, log in self.processes:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            log.close()

    def start(self, argv, env=None, cwd=None):
        log = open(os.path.join(self.tmp, "log-%d" % (len(self.processes),)), "w+b")
        p = subprocess.Popen(argv, cwd=cwd or self.tmp, env=env or dict(os.environ),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((p, log))
        return p, log

    def get(self, port, path):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path),
                                        timeout=2) as answer:
                return answer.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def wait_for(self, predicate, seconds, what):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError("timed out waiting for " + what)

    def test_version(self):
        """twistd claudemesh-broker --version prints claudemesh's version."""
        done = subprocess.run(twistd_command() + ["claudemesh-broker", "--version"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(done.stdout.startswith("claudemesh-broker %s (Twisted " % (__version__,)),
                        done.stdout)

    def test_postgres_database_created_after_start(self):
        """No database: a clear log line with createdb, 503; created later: ready, no restart."""
        dsn, reason = pg.postgres_dsn_or_skip_reason()
        if dsn is None:
            self.skipTest(reason)
        params = psycopg2.extensions.parse_dsn(dsn)
        name = "claudemesh_late_%d_%d" % (os.getpid(), int(time.time() * 1000) % 100000)
        maintenance = psycopg2.extensions.make_dsn(dsn, dbname=params.get("dbname",
                                                                          "postgres"))
        self.addCleanup(pg.run, maintenance, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)'
                        % (name,))
        host = params.get("host", "127.0.0.1")
        auth = urllib.parse.quote(params.get("user", "postgres"))
        if params.get("password"):
            auth += ":" + urllib.parse.quote(params["password"])
        if host.startswith("/"):
            url = "postgresql://%s@/%s?host=%s" % (auth, name, urllib.parse.quote(host))
        else:
            url = "postgresql://%s@%s:%s/%s" % (auth, host, params.get("port", "5432"), name)
        port = free_port()
        env = dict(os.environ, DATABASE_URL=url)
        _, log = self.start(twistd_command() + [
            "-n", "--pidfile=", "claudemesh-broker",
            "--port", "tcp:%d:interface=127.0.0.1" % (port,)], env=env)

        def logged():
            log.seek(0)
            return log.read().decode("utf-8", "replace")

        self.wait_for(lambda: "Create the database: createdb" in logged(), 30, "the log line")
        self.assertEqual(self.get(port, "/health/ready"), 503)
        text = logged()
        self.assertIn('database "%s" does not exist' % (name,), text)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("Unhandled error", text)
        if params.get("password"):
            self.assertNotIn(params["password"], text)
        pg.run(maintenance, 'CREATE DATABASE "%s"' % (name,))
        self.wait_for(lambda: self.get(port, "/health/ready") == 200, 40, "readiness")
        self.assertIn("The store is open (after", logged())

    def test_make_run_port_keeps_loopback(self):
        """make run PORT=N listens on 127.0.0.1:N and creates meshes without a token."""
        if shutil.which("make") is None:
            self.skipTest("make is not installed")
        venv = os.path.dirname(os.path.dirname(sys.executable))
        if not os.path.exists(os.path.join(venv, ".claudemesh-installed")):
            self.skipTest("not running from the Makefile's virtualenv")
        port = free_port()
        data = os.path.join(self.tmp, "data")
        self.start(["make", "-s", "run", "PORT=%d" % (port,), "VENV=%s" % (venv,),
                    "ARGS=--data-dir %s" % (data,)], cwd=ROOT)
        self.wait_for(lambda: self.get(port, "/health") == 200, 40, "make run")
        env = dict(os.environ, CLAUDEMESH_CONFIG_DIR=os.path.join(self.tmp, "cfg"))
        env.pop("CLAUDEMESH_ADMIN_TOKEN", None)
        done = subprocess.run(claudemesh_command() + [
            "new", "t", "--broker", "ws://127.0.0.1:%d/ws" % (port,)], env=env,
            capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True)
        if listening.returncode == 0:
            self.assertIn("127.0.0.1:%d " % (port,), listening.stdout)
            self.assertNotIn("0.0.0.0:%d " % (port,), listening.stdout)
        refused = subprocess.run(["make", "-s", "run", "ARGS=--port tcp:%d" % (free_port(),),
                                  "VENV=%s" % (venv,)], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30)
        self.assertEqual(refused.returncode, 2)
        self.assertIn("use PORT=", refused.stderr)

    def test_make_install_links_the_command(self):
        """make install BINDIR=D puts a working claudemesh in D."""
        if shutil.which("make") is None:
            self.skipTest("make is not installed")
        venv = os.path.dirname(os.path.dirname(sys.executable))
        if not os.path.exists(os.path.join(venv, ".claudemesh-installed")):
            self.skipTest("not running from the Makefile's virtualenv")
        bindir = os.path.join(self.tmp, "bin")
        done = subprocess.run(["make", "-s", "install", "BINDIR=%s" % (bindir,),
                               "VENV=%s" % (venv,)], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        version = subprocess.run([os.path.join(bindir, "claudemesh"), "--version"],
                                 capture_output=True, text=True, timeout=30)
        self.assertEqual(version.stdout, "claudemesh %s\n" % (__version__,))


class MCPSendTooLargeTests(TestCase):
    """
    The MCP send_message tool answers a too-large message as the CLI does.
    """

    @defer.inlineCallbacks
    def test_send_message_too_large(self):
        """send_message of a message over the limit: an error result naming both sizes."""
        directory = self.mktemp()
        os.makedirs(directory)
        broker = yield InProcessBroker(global_reactor, directory, max_message_bytes=4096).start()
        self.addCleanup(broker.stop)
        entry = yield broker.new_mesh()
        b = bridge.Bridge(global_reactor, [entry], "mcp-1", lambda content, meta: None)
        b.start()
        self.addCleanup(b.stop)
        yield b.links[0].client.when_ready()
        result = yield b.call("send_message", {"to": "*", "message": "x" * 5000})
        # Let the requests the bridge makes on connecting be answered before
        # the cleanup closes the connection.
        yield task.deferLater(global_reactor, 0.5, lambda: None)
        self.assertTrue(result.error)
        self.assertIn("message too large: 5,000 bytes of text", result.text)
        self.assertIn("at most 4,096 bytes per frame", result.text)
        self.assertIsInstance(connection.MessageTooLarge(1, 2), connection.ClientError)
