"""
C{claudemesh install [--no-hooks]} / C{uninstall} on fixture Claude Code
settings files, with C{HOME} pointed at a temporary directory: backup
first, idempotent, unrelated keys kept, and uninstall removing exactly what
install added. Runs L{claudemesh.cli.main.main} in-process (no reactor).
"""

import io
import json
import os
import shlex
import sys

from twisted.trial.unittest import SynchronousTestCase

from claudemesh.cli import install
from claudemesh.cli.main import main

CLAUDE_JSON = {
    "numStartups": 12,
    "theme": "dark",
    "mcpServers": {"other": {"command": "other-server", "args": ["--x"]}},
    "projects": {"/home/u/app": {"allowedTools": [], "history": [{"display": "hi"}]}},
}

SETTINGS = {
    "model": "opus",
    "permissions": {"allow": ["Bash(ls:*)"]},
    "hooks": {
        "Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}],
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command",
                                                      "command": "audit.sh"}]}],
    },
}


class InstallTests(SynchronousTestCase):
    """
    The round trip on fixture files.
    """

    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.home, ".claude"))
        self.env = {"HOME": self.home, "PATH": os.environ.get("PATH", ""),
                    "CLAUDEMESH_CONFIG_DIR": os.path.join(self.home, ".claudemesh")}
        self.patch(os, "environ", self.env)
        self.claude_json = os.path.join(self.home, ".claude.json")
        self.settings = os.path.join(self.home, ".claude", "settings.json")
        self.backups = os.path.join(self.home, ".claude", "backups")

    def write(self, path, document, mode=0o600):
        with open(path, "w") as f:
            json.dump(document, f, indent=2)
        os.chmod(path, mode)

    def read(self, path):
        with open(path) as f:
            return json.load(f)

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def backup_names(self):
        return sorted(os.listdir(self.backups)) if os.path.isdir(self.backups) else []

    def test_round_trip(self):
        """install adds our entries (backup first), twice changes nothing, uninstall restores."""
        self.write(self.claude_json, CLAUDE_JSON)
        self.write(self.settings, SETTINGS, 0o644)
        code, out, err = self.run_main("install")
        self.assertEqual((code, err), (0, ""))
        self.assertIn('✓ MCP server "claudemesh" added', out)
        self.assertIn("4 added, 0 already present", out)
        self.assertIn("✓ Status line added", out)
        self.assertIn("Restart Claude Code", out)

        # Backups hold the originals.
        names = self.backup_names()
        self.assertEqual(len(names), 2)
        self.assertEqual(sorted(n.split(".pre-claudemesh.")[0] for n in names),
                         [".claude.json", "settings.json"])
        for name in names:
            original = CLAUDE_JSON if name.startswith(".claude.json") else SETTINGS
            self.assertEqual(self.read(os.path.join(self.backups, name)), original)

        claude = self.read(self.claude_json)
        entry = claude["mcpServers"]["claudemesh"]
        self.assertEqual(entry["args"][-1], "mcp")
        self.assertTrue(os.path.isabs(entry["command"]))
        self.assertEqual({k: v for k, v in claude.items() if k != "mcpServers"},
                         {k: v for k, v in CLAUDE_JSON.items() if k != "mcpServers"})
        self.assertEqual(claude["mcpServers"]["other"], CLAUDE_JSON["mcpServers"]["other"])
        self.assertEqual(os.stat(self.claude_json).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.settings).st_mode & 0o777, 0o644)

        settings = self.read(self.settings)
        self.assertEqual(settings["model"], "opus")
        self.assertEqual(settings["permissions"], SETTINGS["permissions"])
        self.assertEqual(settings["hooks"]["PreToolUse"], SETTINGS["hooks"]["PreToolUse"])
        stop = [h["command"] for g in settings["hooks"]["Stop"] for h in g["hooks"]]
        submit = [h["command"] for g in settings["hooks"]["UserPromptSubmit"]
                  for h in g["hooks"]]
        self.assertEqual(stop[0], "notify-send done")
        self.assertEqual([shlex.split(c)[-2:] for c in stop[1:]], [["hook", "idle"]])
        self.assertEqual([shlex.split(c)[-2:] for c in submit], [["hook", "working"]])
        for event, status in (("StopFailure", "idle"), ("SessionStart", "idle")):
            [command] = [h["command"] for g in settings["hooks"][event] for h in g["hooks"]]
            self.assertEqual(shlex.split(command)[-2:], ["hook", status])
        # exec: the hook replaces Claude Code's /bin/sh -c, so its parent
        # is Claude Code.
        self.assertTrue(all(c.startswith("exec /") for c in stop[1:] + submit), stop + submit)
        self.assertEqual(settings["statusLine"]["type"], "command")
        self.assertEqual(shlex.split(settings["statusLine"]["command"])[-1], "statusline")
        self.assertEqual(install.hooks_registered(self.env),
                         {"UserPromptSubmit", "Stop", "StopFailure", "SessionStart"})
        self.assertTrue(install.statusline_registered(self.env))
        self.assertTrue(install.mcp_registered(self.env))

        # Idempotent: same bytes, no new backup.
        before = (open(self.claude_json).read(), open(self.settings).read())
        code, out, _ = self.run_main("install")
        self.assertEqual(code, 0)
        self.assertIn('✓ MCP server "claudemesh" unchanged', out)
        self.assertIn("0 added, 4 already present", out)
        self.assertIn("✓ Status line unchanged", out)
        self.assertEqual((open(self.claude_json).read(), open(self.settings).read()), before)
        self.assertEqual(len(self.backup_names()), 2)

        code, out, err = self.run_main("uninstall")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("removed", out)
        self.assertEqual(self.read(self.claude_json), CLAUDE_JSON)
        self.assertEqual(self.read(self.settings), SETTINGS)
        self.assertEqual(len(self.backup_names()), 4)
        # Nothing left to remove: nothing written.
        self.run_main("uninstall")
        self.assertEqual(len(self.backup_names()), 4)

    def test_fresh_home(self):
        """Without any file, install creates both (0600) and uninstall leaves them empty objects."""
        code, out, _ = self.run_main("install")
        self.assertEqual(code, 0)
        self.assertEqual(self.backup_names(), [])
        self.assertEqual(os.stat(self.claude_json).st_mode & 0o777, 0o600)
        self.assertEqual(list(self.read(self.claude_json)["mcpServers"]), ["claudemesh"])
        self.assertEqual(sorted(self.read(self.settings)["hooks"]),
                         ["SessionStart", "Stop", "StopFailure", "UserPromptSubmit"])
        self.assertIn("join a mesh", out)
        self.run_main("uninstall")
        self.assertEqual(self.read(self.claude_json), {})
        self.assertEqual(self.read(self.settings), {})

    def test_no_hooks(self):
        """--no-hooks registers the MCP server only."""
        self.write(self.settings, SETTINGS)
        code, out, _ = self.run_main("install", "--no-hooks")
        self.assertEqual(code, 0)
        self.assertNotIn("Hooks", out)
        self.assertEqual(self.read(self.settings), SETTINGS)
        self.assertTrue(install.mcp_registered(self.env))

    def test_moved_install_updates_in_place(self):
        """A hook from another install path is updated, not doubled; the MCP entry is 'updated'."""
        self.write(self.claude_json, {"mcpServers": {"claudemesh": {
            "command": "/old/bin/claudemesh", "args": ["mcp"], "env": {"X": "1"}}}})
        self.write(self.settings, {"hooks": {"Stop": [{"hooks": [
            {"type": "command", "command": "/old/bin/claudemesh hook idle"}]}]}})
        code, out, _ = self.run_main("install")
        self.assertIn('"claudemesh" updated', out)
        entry = self.read(self.claude_json)["mcpServers"]["claudemesh"]
        self.assertEqual(entry["env"], {"X": "1"})
        self.assertNotEqual(entry["command"], "/old/bin/claudemesh")
        stop = self.read(self.settings)["hooks"]["Stop"]
        self.assertEqual(len(stop), 1)
        self.assertNotIn("/old/", stop[0]["hooks"][0]["command"])
        self.assertTrue(stop[0]["hooks"][0]["command"].startswith("exec "))

    def test_own_status_line_kept(self):
        """A status line of the user's own is kept by install (which says how) and uninstall."""
        mine = {"type": "command", "command": "~/bin/my-status"}
        self.write(self.settings, {"statusLine": mine})
        code, out, _ = self.run_main("install")
        self.assertEqual(code, 0)
        self.assertIn("You have a status line already", out)
        self.assertIn("claudemesh statusline", out)
        self.assertEqual(self.read(self.settings)["statusLine"], mine)
        self.run_main("uninstall")
        self.assertEqual(self.read(self.settings), {"statusLine": mine})

    def test_corrupt_file_untouched(self):
        """A settings file that is not JSON is reported (exit 1) and left as it is."""
        with open(self.claude_json, "w") as f:
            f.write("{not json")
        code, _, err = self.run_main("install")
        self.assertEqual(code, 1)
        self.assertIn("not valid JSON", err)
        self.assertEqual(open(self.claude_json).read(), "{not json")
        self.assertEqual(self.backup_names(), [])

    def test_our_hook_recognition(self):
        """Only 'claudemesh hook <status>' commands (any path, or python -m) count as ours."""
        for command in ("claudemesh hook idle", "'/a b/claudemesh' hook working",
                        "'/x/claudemesh' hook dnd", "exec /x/claudemesh hook idle",
                        "/usr/bin/python3 -m claudemesh.cli.main hook idle",
                        "exec /usr/bin/python3 -m claudemesh.cli.main hook working"):
            self.assertTrue(install.is_our_hook(command), command)
        for command in ("claudemesh hooks idle", "notclaudemesh hook idle", "echo claudemesh",
                        "claudemesh hook idle && rm -rf x", None, "claudemesh hook busy",
                        "exec exec claudemesh hook idle", "exec",
                        "unbalanced 'quote"):
            self.assertFalse(install.is_our_hook(command), command)
