"""
Issue 13, "a newcomer's first hour", as a newcomer meets it: C{claudemesh}
run as subprocesses (on a pseudo-terminal where a terminal matters) against
a real broker subprocess, asserting what the user reads and the exit codes.
The broker-side start-up items (Postgres, C{make run PORT=}, C{--version})
are in L{tests.test_broker_newcomer}.
"""

import json
import os
import pty
import select
import signal
import subprocess
import time

from claudemesh import crypto
from claudemesh.client import config
from tests.clientfixture import free_port
from tests.test_cli_commands import CLIBrokerFixture, claudemesh_command, twistd_command

try:
    import zxingcpp
except ImportError:
    zxingcpp = None

HALF_BLOCKS = {"█": (1, 1), "▀": (1, 0), "▄": (0, 1), " ": (0, 0)}


def run_on_terminal(argv, env, timeout=30, stderr_too=True):
    """
    Run C{argv} with stdout (and stderr) on a pseudo-terminal; returns
    C{(exit code, what the terminal showed)}.
    """
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                               stderr=slave if stderr_too else subprocess.PIPE)
    os.close(slave)
    chunks = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(master)
    code = process.wait(10)
    if process.stderr is not None:
        process.stderr.close()
    return code, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def qr_matrix(text):
    """
    The modules of the half-block QR code in C{text} (light = 1), one list
    per module row, or C{[]} when there is none.
    """
    rows = [line for line in text.split("\n") if line and set(line) <= set(HALF_BLOCKS)
            and "█" in line]
    matrix = []
    for line in rows:
        top = [HALF_BLOCKS[c][0] for c in line]
        bottom = [HALF_BLOCKS[c][1] for c in line]
        matrix += [top, bottom]
    return matrix


def decode_qr(matrix, scale=6):
    """
    The text of the QR code drawn as C{matrix}, read by zxing-cpp from a
    grey image of it (each module C{scale} pixels square).
    """
    width = len(matrix[0]) * scale
    pixels = bytearray()
    for row in matrix:
        line = bytearray()
        for light in row:
            line += (b"\xff" if light else b"\x00") * scale
        pixels += bytes(line) * scale
    image = memoryview(bytes(pixels)).cast("B", (len(matrix) * scale, width))
    return [result.text for result in zxingcpp.read_barcodes(image)]


class NewcomerCLITests(CLIBrokerFixture):
    """
    The broken items and the friction of issue 13, each as a user runs it.
    """

    def link(self, who="owner", *args):
        return json.loads(self.ok(who, "invite", "--json", *args))["link"]

    # -- Broken 1: a large message ------------------------------------------------

    def test_large_message_refused_at_once(self):
        """50 KB to a 16 KiB broker: exit 6 at once, both sizes named, nothing re-sent."""
        self.mesh_with("bob")
        started = time.time()
        code, out, err = self.cm("owner", "send", "bob", "x" * 50_000)
        self.assertEqual(code, 6, err)
        self.assertLess(time.time() - started, 8)
        self.assertIn("message too large: 50,000 bytes of text make a", err)
        self.assertIn("at most 65,536 bytes per frame", err)
        with open(os.path.join(self.tmp, "broker.log"), "rb") as f:
            log = f.read().decode("utf-8", "replace")
        self.assertNotIn("exceeds payload limit", log)
        self.assertEqual(self.ok("bob", "inbox", "--json", "--wait", "0.5"), "[]\n")

    # -- Broken 3: a URL without /ws, and moving a mesh ----------------------------

    def test_url_without_ws_is_fixed_and_broker_can_move(self):
        """new --broker ws://host:port works (saved with /ws); set-broker moves, checking first."""
        bare = "ws://127.0.0.1:%d" % (self.port,)
        code, out, err = self.cm("owner", "new", self.mesh, "--name", "owner", "--broker", bare)
        self.assertEqual(code, 0, err)
        self.assertIn("using %s/ws" % (bare,), err)
        self.assertEqual(json.loads(self.ok("owner", "list", "--json"))[0]["brokerUrl"],
                         bare + "/ws")
        self.ok("owner", "peers")
        dead = "ws://127.0.0.1:%d/ws" % (free_port(),)
        code, _, err = self.cm("owner", "set-broker", dead)
        self.assertEqual(code, 4, err)
        self.assertEqual(json.loads(self.ok("owner", "list", "--json"))[0]["brokerUrl"],
                         bare + "/ws")
        alias = "ws://localhost:%d/ws" % (self.port,)
        out = self.ok("owner", "set-broker", alias)
        self.assertIn("now uses %s" % (alias,), out)
        self.assertEqual(json.loads(self.ok("owner", "list", "--json"))[0]["brokerUrl"], alias)
        code, _, err = self.cm("owner", "set-broker", "ws://localhost:1/socket")
        self.assertEqual(code, 3)
        self.assertIn("/ws", err)
        # A config saved by an older claudemesh, without the /ws, still works.
        path = os.path.join(self.dir, "owner", "config.json")
        with open(path) as f:
            document = json.load(f)
        document["meshes"][0]["brokerUrl"] = bare
        with open(path, "w") as f:
            json.dump(document, f)
        code, out, err = self.cm("owner", "peers")
        self.assertEqual(code, 0, err)
        self.assertIn("save it with: claudemesh set-broker %s/ws" % (bare,), err)

    # -- Broken 4: re-joining keeps the name -----------------------------------------

    def test_rejoin_keeps_the_name(self):
        """join again without --name keeps 'dave', not $USER."""
        self.ok("owner", "new", self.mesh, "--name", "owner")
        link = self.link("owner", "--uses", "2")
        self.ok("dave", "join", link, "--name", "dave")
        out = self.ok("dave", "join", link)
        self.assertIn("as dave", out)
        self.assertEqual(json.loads(self.ok("dave", "whoami", "--json"))["meshes"][0]
                         ["displayName"], "dave")

    # -- Broken 5: a wrong mesh key ---------------------------------------------------

    def test_wrong_mesh_key_refused_and_doctor_checks(self):
        """One character changed after '#': join exits 3; doctor flags a wrong stored key."""
        self.ok("owner", "new", self.mesh, "--name", "owner")
        link = self.link()
        head, key = link.split("#")
        altered = head + "#" + ("A" if key[0] != "A" else "B") + key[1:]
        code, out, err = self.cm("bob", "join", altered, "--name", "bob")
        self.assertEqual(code, 3, (out, err))
        self.assertIn("does not match this invite", err)
        out = self.ok("bob", "join", link, "--name", "bob")
        self.assertIn("mesh key:  verified against the invite", out)
        code, out, _ = self.cm("bob", "doctor")
        self.assertIn("mesh key present and matches the invite's check value", out)
        path = os.path.join(self.dir, "bob", "config.json")
        with open(path) as f:
            document = json.load(f)
        document["meshes"][0]["meshKey"] = crypto.encode_mesh_key(crypto.new_mesh_key())
        with open(path, "w") as f:
            json.dump(document, f)
        code, out, _ = self.cm("bob", "doctor")
        self.assertEqual(code, 1)
        self.assertIn("✗ %s: mesh key WRONG" % (self.mesh,), out)

    # -- Broken 7: presence of one-shot commands; broker loss in listen -----------------

    def test_listen_quiet_about_inbox_and_loud_about_the_broker(self):
        """inbox runs make no presence events; listen says when the broker goes and comes back."""
        self.mesh_with("alice", "bob")
        listener = self.listen("alice")
        self.ok("bob", "inbox", "--wait", "0.2")
        self.ok("bob", "peers")
        self.ok("owner", "send", "alice", "marker")
        line = json.loads(listener.stdout.readline())
        self.assertEqual(line.get("text"), "marker", line)
        # Broker restart on the same port and data.
        self.broker.send_signal(signal.SIGTERM)
        self.broker.wait(15)
        self.broker = subprocess.Popen(
            twistd_command() + ["-n", "--pidfile=", "claudemesh-broker",
                                "--port", "tcp:%d:interface=127.0.0.1" % (self.port,),
                                "--data-dir", os.path.join(self.tmp, "data")],
            cwd=self.tmp, stdout=self.log, stderr=subprocess.STDOUT)
        events = [json.loads(listener.stdout.readline()) for _ in range(2)]
        self.assertEqual([e["event"] for e in events], ["broker_lost", "broker_reconnected"])
        self.assertEqual(events[0]["eventData"]["code"], 1001)

    # -- Broken 8: honest results -------------------------------------------------------

    def test_honest_results(self):
        """kick of a dropped session, status without a session, empty group, dnd peer."""
        self.mesh_with("alice", "bob")
        code, _, err = self.cm("owner", "status", "working")
        self.assertEqual(code, 1)
        self.assertIn("no session of yours is connected", err)
        code, _, err = self.cm("owner", "send", "@devs", "anyone?")
        self.assertEqual(code, 1)
        self.assertIn("nobody received it: no other member in @devs is connected", err)
        listener = self.listen("alice")
        self.assertIn("Status set to dnd on 1 session.", self.ok("alice", "status", "dnd"))
        out = self.ok("owner", "send", "alice", "are you there")
        self.assertIn("Queued for alice — dnd: held until they are idle", out)
        out = self.ok("owner", "send", "alice", "urgent", "--priority", "now")
        self.assertIn("Sent to alice: pushed to a live session", out)
        out = self.ok("owner", "send", "*", "hello all")
        self.assertIn("Sent to *: 1 member, 0 pushed now, 1 waiting (busy or away)", out)
        listener.kill()
        listener.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline:
            peers = json.loads(self.ok("owner", "peers", "--json"))
            if [p["online"] for p in peers] == [False]:
                break
            time.sleep(0.2)
        out = self.ok("owner", "kick", "--all")
        self.assertEqual(out, "No connected peer matched.\n"
                              "Also ended 1 session that was not connected (in grace after a "
                              "drop): alice\n")
        self.assertEqual(self.ok("owner", "kick", "--all"), "No peers matched.\n")

    # -- Friction: default mesh, global flags ---------------------------------------------

    def test_default_mesh_and_global_flags(self):
        """With two meshes: use, CLAUDEMESH_MESH and --mesh/--json before the command."""
        self.ok("owner", "new", self.mesh, "--name", "owner")
        code, _, err = self.cm("owner", "new", self.mesh, "--name", "owner")
        self.assertEqual(code, 0, err)
        self.assertIn('you already had a mesh called "%s"' % (self.mesh,), err)
        slugs = [m["slug"] for m in json.loads(self.ok("owner", "--json", "list"))]
        self.assertEqual(len(slugs), 2)
        code, _, err = self.cm("owner", "peers")
        self.assertEqual(code, 1)
        self.assertIn("claudemesh use", err)
        self.ok("owner", "--mesh", slugs[1], "peers")
        self.assertIn(slugs[1], self.ok("owner", "use", slugs[1]))
        self.assertIn("peers on %s" % (slugs[1],), self.ok("owner", "peers"))
        self.assertIn("peers on %s" % (slugs[0],),
                      self.cm("owner", "peers", env={"CLAUDEMESH_MESH": slugs[0]})[1])
        self.assertEqual(json.loads(self.ok("owner", "--json", "--mesh", slugs[0], "peers")), [])

    # -- Friction: the QR code -------------------------------------------------------------

    def test_invite_qr_fits_and_decodes(self):
        """On a terminal the QR code is at most 80 columns, decodes to a link join accepts."""
        if zxingcpp is None:
            self.skipTest("zxing-cpp (a test extra) is not installed")
        self.ok("owner", "new", self.mesh, "--name", "owner")
        code, shown = run_on_terminal(claudemesh_command() + ["invite"], self.env("owner"))
        self.assertEqual(code, 0, shown)
        matrix = qr_matrix(shown)
        self.assertTrue(matrix, shown)
        self.assertLessEqual(max(len(line) for line in shown.split("\n")
                                 if set(line) <= set(HALF_BLOCKS)), 80)
        [text] = decode_qr(matrix)
        self.assertTrue(text.startswith("claudemesh://join/c1."), text)
        out = self.ok("bob", "join", text, "--name", "bob")
        self.assertIn("mesh key:  verified against the invite", out)

    # -- Friction: spinner, typos, errors that say what to do --------------------------------

    def test_spinner_only_on_a_terminal(self):
        """inbox --wait shows a spinner on a terminal and nothing when piped."""
        self.mesh_with("bob")
        code, shown = run_on_terminal(claudemesh_command() + ["inbox", "--wait", "0.5"],
                                      self.env("bob"))
        self.assertEqual(code, 0, shown)
        self.assertIn("waiting 0.5s for messages…", shown)
        code, out, err = self.cm("bob", "inbox", "--wait", "0.5")
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("⠋", out)

    def test_messages_that_say_what_to_do(self):
        """Typos, a short prefix, an unknown name, --expires 5, a used-up invite."""
        self.mesh_with("bob")
        code, _, err = self.cm("owner", "sedn", "bob", "hi")
        self.assertEqual(code, 3)
        self.assertIn("did you mean send?", err)
        code, _, err = self.cm("owner", "invite", "--expires", "5")
        self.assertEqual(code, 3)
        self.assertIn("'5' is 5 seconds; an invite lasts at least 1m", err)
        self.assertNotIn("expiresIn", err)
        code, _, err = self.cm("owner", "send", "abcd", "hi")
        self.assertEqual(code, 5)
        self.assertIn("8 or more hex characters", err)
        code, _, err = self.cm("owner", "send", "nobody", "hi")
        self.assertEqual(code, 5)
        self.assertIn("claudemesh peers", err)
        link = self.link()
        self.ok("carol", "join", link, "--name", "carol")
        code, _, err = self.cm("dave", "join", link, "--name", "dave")
        self.assertEqual(code, 1)
        self.assertIn("ask the mesh owner (or an admin) for a new invite link", err)

    def test_wss_against_plain_broker_fails_fast(self):
        """wss:// for a plain broker: a TLS message naming the ws:// URL, within seconds."""
        started = time.time()
        code, _, err = self.cm("owner", "new", "x", "--broker",
                               "wss://127.0.0.1:%d/ws" % (self.port,))
        self.assertEqual(code, 4)
        self.assertIn("TLS handshake", err)
        self.assertIn("ws://127.0.0.1:%d/ws" % (self.port,), err)
        self.assertNotIn("Failure", err)
        self.assertLess(time.time() - started, 8)

    # -- Friction: the missing commands ------------------------------------------------------

    def test_members_groups_message_status_stdin_invites(self):
        """members, join/leave-group, status <id>, send -, invites with expiry and id prefixes."""
        self.mesh_with("alice")
        members = json.loads(self.ok("owner", "members", "--json"))
        self.assertEqual([(m["name"], m["online"]) for m in members],
                         [("owner", False), ("alice", False)])
        self.assertIn("@devs: no session of yours is connected", self.ok("alice", "join-group",
                                                                         "devs"))
        listener = self.listen("alice")
        code, out, err = self.cm("owner", "send", "@devs", "-", stdin="from stdin\n")
        self.assertEqual(code, 0, err)
        message_id = json.loads(self.cm("owner", "--json", "send", "alice", "-",
                                        stdin="second")[1])["messageId"]
        self.assertEqual(json.loads(listener.stdout.readline())["text"], "from stdin")
        self.assertEqual(json.loads(listener.stdout.readline())["text"], "second")
        deadline = time.time() + 10
        while time.time() < deadline:
            status = json.loads(self.ok("owner", "status", message_id, "--json"))
            if status["recipients"][0]["status"] == "delivered":
                break
            time.sleep(0.2)
        self.assertEqual([(r["name"], r["status"]) for r in status["recipients"]],
                         [("alice", "delivered")])
        # The target by name, not as its 64-hex key.
        self.assertEqual(self.ok("owner", "status", message_id).splitlines()[0],
                         "message %s to alice: 1 recipient" % (message_id,))
        out = self.ok("alice", "leave-group", "devs")
        self.assertIn("@devs: left by 1 session of yours.", out)
        self.assertEqual(config.load(os.path.join(self.dir, "alice")).meshes[0].groups, [])
        listing = self.ok("owner", "invites")
        self.assertIn("expires", listing.splitlines()[0])
        invite_id = json.loads(self.ok("owner", "invites", "--json"))[0]["inviteId"]
        self.assertIn(invite_id[:8], listing)
        self.assertIn("Revoked invite %s." % (invite_id,),
                      self.ok("owner", "invites", "--revoke", invite_id[:8]))

    def test_completion_scripts(self):
        """completion bash|zsh prints scripts naming the commands; bash accepts its syntax."""
        code, out, _ = self.cm("owner", "completion", "bash")
        self.assertEqual(code, 0)
        self.assertIn("join-group", out)
        checked = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
        self.assertEqual(checked.returncode, 0, checked.stderr)
        code, out, _ = self.cm("owner", "completion", "zsh")
        self.assertEqual(code, 0)
        self.assertIn("#compdef claudemesh", out)
