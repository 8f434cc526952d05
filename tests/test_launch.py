"""
C{claudemesh launch} and a bare C{claudemesh}, as subprocesses with a fake
C{claude} first on C{PATH} that records its arguments and environment and
exits with a chosen status; C{HOME} is a temporary directory.
"""

import json
import os
import subprocess
import sys
import uuid

from twisted.trial.unittest import SynchronousTestCase

from claudemesh.cli import launch
from claudemesh.client import config
from tests.test_cli_commands import claudemesh_command
from tests.test_client_units import make_entry

FAKE_CLAUDE = """#!%s
import json, os, sys
if sys.argv[1:] == ["--version"]:
    print(os.environ.get("FAKE_CLAUDE_VERSION", "2.1.332 (Claude Code)"))
    sys.exit(0)
with open(os.environ["FAKE_CLAUDE_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid(),
               "env": {k: v for k, v in os.environ.items() if k.startswith("CLAUDEMESH_")}}, f)
sys.exit(int(os.environ.get("FAKE_CLAUDE_EXIT", "0")))
"""


class LaunchTests(SynchronousTestCase):
    """
    What claude is started with, and what launch says when it cannot.
    """

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        self.bin = os.path.join(self.tmp, "bin")
        self.home = os.path.join(self.tmp, "home")
        self.cfg = os.path.join(self.tmp, "cfg")
        os.makedirs(self.bin)
        os.makedirs(self.home)
        self.record = os.path.join(self.tmp, "record.json")
        claude = os.path.join(self.bin, "claude")
        with open(claude, "w") as f:
            f.write(FAKE_CLAUDE % (sys.executable,))
        os.chmod(claude, 0o755)

    def join(self, *entries):
        cfg = config.Config()
        for entry in entries:
            cfg.put(entry)
        config.save(self.cfg, cfg)

    def run_cm(self, *args, path=None, **extra):
        env = dict(os.environ, HOME=self.home, CLAUDEMESH_CONFIG_DIR=self.cfg,
                   FAKE_CLAUDE_RECORD=self.record,
                   PATH=path if path is not None else self.bin + os.pathsep + os.defpath)
        for key in ("CLAUDEMESH_SESSION_ID", "CLAUDEMESH_DISPLAY_NAME", "CLAUDEMESH_MESH",
                    "CLAUDEMESH_MESSAGE_MODE"):
            env.pop(key, None)
        env.update(extra)
        done = subprocess.run(claudemesh_command() + list(args), env=env, capture_output=True,
                              text=True, timeout=30)
        return done.returncode, done.stdout, done.stderr

    def recorded(self):
        with open(self.record) as f:
            return json.load(f)

    def test_launch_arguments_and_environment(self):
        """claude gets the channel flag ('=' form) and --session-id <uuid>; the env the same id."""
        self.join(make_entry("team", displayName="alice"))
        code, out, err = self.run_cm("launch", "--", "--model", "opus")
        self.assertEqual(code, 0, err)
        seen = self.recorded()
        argv, env = seen["argv"], seen["env"]
        self.assertEqual(argv[0], "--dangerously-load-development-channels=server:claudemesh")
        self.assertEqual(argv[1], "--session-id")
        session = argv[2]
        self.assertEqual(str(uuid.UUID(session)), session)
        self.assertEqual(argv[3:], ["--model", "opus"])
        self.assertEqual(env["CLAUDEMESH_SESSION_ID"], session)
        self.assertEqual(env["CLAUDEMESH_DISPLAY_NAME"], "alice")
        self.assertEqual(env["CLAUDEMESH_CONFIG_DIR"], self.cfg)
        self.assertNotIn("CLAUDEMESH_MESH", env)
        self.assertIn("claudemesh launch — as alice on team", err)
        self.assertIn("claudemesh install", err)  # not registered yet

    def test_exit_status_is_claudes(self):
        """launch ends with claude's exit status."""
        self.join(make_entry("team"))
        code, _, _ = self.run_cm("launch", FAKE_CLAUDE_EXIT="7")
        self.assertEqual(code, 7)

    def test_mesh_name_mode(self):
        """--mesh, --name, --mode reach the environment; a duplicate channel flag is dropped."""
        self.join(make_entry("team"), make_entry("other", meshId="m2"))
        code, _, err = self.run_cm("launch", "--mesh", "other", "--name", "Bob", "--mode",
                                   "inbox", "--", "--dangerously-load-development-channels",
                                   "server:x", "-p", "hi")
        self.assertEqual(code, 0, err)
        seen = self.recorded()
        self.assertEqual(seen["argv"][3:], ["-p", "hi"])
        self.assertEqual(len([a for a in seen["argv"]
                              if a.startswith("--dangerously-load-development-channels")]), 1)
        env = seen["env"]
        self.assertEqual((env["CLAUDEMESH_MESH"], env["CLAUDEMESH_DISPLAY_NAME"],
                          env["CLAUDEMESH_MESSAGE_MODE"]), ("other", "Bob", "inbox"))

    def test_resume_has_no_session_id(self):
        """With --resume, claude picks the session: no --session-id, no CLAUDEMESH_SESSION_ID."""
        self.join(make_entry("team"))
        code, _, err = self.run_cm("launch", "--", "--resume", "abc",
                                   CLAUDEMESH_SESSION_ID="inherited")
        self.assertEqual(code, 0, err)
        seen = self.recorded()
        self.assertNotIn("--session-id", seen["argv"])
        self.assertEqual(seen["argv"][1:], ["--resume", "abc"])
        self.assertNotIn("CLAUDEMESH_SESSION_ID", seen["env"])

    def test_prompt_after_the_channel_flag(self):
        """A prompt behind the channel flag stays a prompt: launch -- "hello" -c -p."""
        self.join(make_entry("team"))
        code, _, err = self.run_cm("launch", "--", "hello", "-c", "-p")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.recorded()["argv"], [
            "--dangerously-load-development-channels=server:claudemesh", "hello", "-c", "-p"])

    def test_bare_claudemesh_launches(self):
        """A bare 'claudemesh' launches when a mesh is joined."""
        self.join(make_entry("team"))
        code, _, err = self.run_cm()
        self.assertEqual(code, 0, err)
        self.assertIn("--session-id", self.recorded()["argv"])

    def test_bare_claudemesh_without_mesh(self):
        """With no mesh joined, a bare 'claudemesh' prints the help and how to join, exit 0."""
        code, out, _ = self.run_cm()
        self.assertEqual(code, 0)
        self.assertIn("usage: claudemesh", out)
        self.assertIn("claudemesh join", out)
        self.assertFalse(os.path.exists(self.record))

    def test_launch_without_mesh(self):
        """'claudemesh launch' with no mesh joined fails with the join hint, exit 1."""
        code, _, err = self.run_cm("launch")
        self.assertEqual(code, 1)
        self.assertIn("No meshes joined", err)

    def test_unknown_mesh(self):
        """--mesh naming a mesh not joined fails, listing the joined ones."""
        self.join(make_entry("team"))
        code, _, err = self.run_cm("launch", "--mesh", "nope")
        self.assertEqual(code, 1)
        self.assertIn('Mesh "nope" not found. Joined: team', err)

    def test_claude_not_found(self):
        """Without claude on PATH (or in ~/.local/bin): a clear message and exit 5."""
        self.join(make_entry("team"))
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        code, _, err = self.run_cm("launch", path=empty)
        self.assertEqual(code, 5)
        self.assertIn("✗ `claude` not found on PATH. Install Claude Code first.", err)


class CommandTests(SynchronousTestCase):
    """
    The argv builder, in-process.
    """

    def test_passthrough(self):
        """A leading '--' is dropped; our channel flag is not doubled."""
        ours = launch.CHANNELS_FLAG + "=" + launch.CHANNEL
        self.assertEqual(launch.claude_command("/c", "s", ["--", "-x"]),
                         ["/c", ours, "--session-id", "s", "-x"])
        self.assertEqual(
            launch.claude_command("/c", None, [launch.CHANNELS_FLAG + "=server:y", "-c"]),
            ["/c", ours, "-c"])

    def test_resumes(self):
        """--resume, -r, --continue, -c and --resume=ID count as resuming."""
        for args in (["--resume"], ["-r", "x"], ["--continue"], ["-c"], ["--resume=x"]):
            self.assertTrue(launch.resumes(args), args)
        self.assertFalse(launch.resumes(["--model", "x"]))
