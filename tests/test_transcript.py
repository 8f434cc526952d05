"""
Transcript status inference (L{claudemesh.mcpserver.transcript}): the
project key derivation cases of the original (upstream-broker 6.3) plus
ours, the working/idle rule on fixture transcripts, tail reading, and the
poller on a fake clock.
"""

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudemesh.mcpserver import transcript


def entry(kind, *content):
    return {"type": kind, "message": {"role": kind, "content": list(content)}}


TEXT = {"type": "text", "text": "done"}
TOOL_USE = {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}
TOOL_RESULT = {"type": "tool_result", "tool_use_id": "t1", "content": "assistant said"}


def write_transcript(path, entries, junk=b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(junk)
        for e in entries:
            f.write(json.dumps(e).encode() + b"\n")


class ProjectKeyTests(SynchronousTestCase):
    """
    project_keys: the candidates for ~/.claude/projects/<key>.
    """

    def test_unix_path(self):
        """/Users/x/foo → -Users-x-foo first."""
        self.assertEqual(transcript.project_keys("/Users/x/foo")[0], "-Users-x-foo")

    def test_windows_drive_root_child(self):
        """H:\\Claude → H--Claude first."""
        self.assertEqual(transcript.project_keys("H:\\Claude")[0], "H--Claude")

    def test_windows_path(self):
        """C:\\Users\\Alice\\dev\\myapp → C--Users-Alice-dev-myapp first."""
        self.assertEqual(transcript.project_keys("C:\\Users\\Alice\\dev\\myapp")[0],
                         "C--Users-Alice-dev-myapp")

    def test_drive_letter_stripped(self):
        """C:\\Users\\Alice also yields -Users-Alice (drive letter dropped)."""
        keys = transcript.project_keys("C:\\Users\\Alice")
        self.assertEqual(keys[0], "C--Users-Alice")
        self.assertIn("-Users-Alice", keys)

    def test_relative_path_gets_dash_variant(self):
        """project/foo yields project-foo and then -project-foo."""
        keys = transcript.project_keys("project/foo")
        self.assertEqual(keys[:2], ["project-foo", "-project-foo"])

    def test_order_and_no_duplicates(self):
        """A plain unix path has exactly one candidate: all rules agree."""
        self.assertEqual(transcript.project_keys("/home/u/app"), ["-home-u-app"])

    def test_non_alphanumerics_last(self):
        """Dots and underscores become dashes in the last candidate (current Claude Code)."""
        keys = transcript.project_keys("/home/u/my.app_x")
        self.assertEqual(keys, ["-home-u-my.app_x", "-home-u-my-app-x"])


class RuleTests(SynchronousTestCase):
    """
    infer_status on fixture transcripts.
    """

    def setUp(self):
        self.path = os.path.join(self.mktemp(), "s.jsonl")

    def infer(self, entries, **kw):
        write_transcript(self.path, entries, kw.pop("junk", b""))
        return transcript.infer_status(self.path, **kw)

    def test_last_assistant_tool_use_is_working(self):
        """The last assistant entry asks for a tool (its result follows): working."""
        self.assertEqual(self.infer([entry("user", TEXT), entry("assistant", TEXT, TOOL_USE),
                                     entry("user", TOOL_RESULT)]), "working")

    def test_last_assistant_text_is_idle(self):
        """The turn ended with text only: idle."""
        self.assertEqual(self.infer([entry("assistant", TOOL_USE), entry("user", TOOL_RESULT),
                                     entry("assistant", TEXT)]), "idle")

    def test_no_assistant_entry_is_idle(self):
        """A transcript with only user entries (or summaries) is idle."""
        self.assertEqual(self.infer([entry("user", TEXT), {"type": "summary", "x": 1}]), "idle")

    def test_broken_lines_are_skipped(self):
        """A cut or corrupt last line does not hide the entry before it."""
        write_transcript(self.path, [entry("assistant", TOOL_USE)])
        with open(self.path, "ab") as f:
            f.write(b'{"type": "assistant", "message": {"content": [{"ty')
        self.assertEqual(transcript.infer_status(self.path), "working")

    def test_string_content_is_not_an_entry(self):
        """An assistant entry whose content is a string is skipped, as the rule says."""
        self.assertEqual(self.infer([entry("assistant", TOOL_USE),
                                     {"type": "assistant", "message": {"content": "hi"}}]),
                         "working")

    def test_only_the_tail_is_read(self):
        """A window of 8 KiB finds the last entry behind megabytes of history."""
        junk = (json.dumps(entry("assistant", TEXT)) + "\n").encode() * 20000
        self.assertEqual(self.infer([entry("assistant", TOOL_USE)], junk=junk), "working")
        reads = []
        real_open = open

        class Spy:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.f.close()

            def seek(self, *a):
                return self.f.seek(*a)

            def read(self, n=-1):
                reads.append(n)
                return self.f.read(n)

        # A module global shadows the builtin for infer_status only.
        transcript.open = lambda p, m: Spy(real_open(p, m))
        self.addCleanup(delattr, transcript, "open")
        transcript.infer_status(self.path)
        self.assertEqual(reads, [transcript.TAIL_BYTES])

    def test_large_last_entry_widens_the_window(self):
        """A last assistant entry bigger than the window is still found."""
        big = dict(TOOL_USE, input={"content": "x" * 50000})
        self.assertEqual(self.infer([entry("assistant", TEXT), entry("assistant", big)]),
                         "working")

    def test_missing_file(self):
        """No file: None (nothing to report)."""
        self.assertIsNone(transcript.infer_status(self.path + ".nope"))


class FindTests(SynchronousTestCase):
    """
    Locating the session's transcript.
    """

    def setUp(self):
        self.root = self.mktemp()
        self.dir = os.path.join(self.root, "-work-app")

    def test_by_session_id(self):
        """With the launched session id, exactly <id>.jsonl is used, even if older."""
        write_transcript(os.path.join(self.dir, "aaa.jsonl"), [])
        write_transcript(os.path.join(self.dir, "bbb.jsonl"), [])
        os.utime(os.path.join(self.dir, "aaa.jsonl"), (1, 1))
        self.assertEqual(transcript.find_transcript("/work/app", "aaa", self.root),
                         os.path.join(self.dir, "aaa.jsonl"))
        self.assertIsNone(transcript.find_transcript("/work/app", "ccc", self.root))

    def test_newest_without_session_id(self):
        """Without a session id the newest transcript of the directory is used (and hinted)."""
        write_transcript(os.path.join(self.dir, "old.jsonl"), [])
        write_transcript(os.path.join(self.dir, "new.jsonl"), [])
        os.utime(os.path.join(self.dir, "old.jsonl"), (1, 1))
        self.assertEqual(transcript.detect_session_id("/work/app", self.root), "new")
        self.assertIsNone(transcript.detect_session_id("/elsewhere", self.root))


class PollerTests(SynchronousTestCase):
    """
    StatusInference on a fake clock.
    """

    def setUp(self):
        self.root = self.mktemp()
        self.path = os.path.join(self.root, "-work-app", "sid.jsonl")
        self.clock = Clock()
        self.reports = []
        self.ttl = 60
        self.poller = transcript.StatusInference(self.clock, "/work/app", self.reports.append,
                                                 session_id="sid", root=self.root,
                                                 interval=0.1, ttl=lambda: self.ttl)

    def test_never_faster_than_two_seconds(self):
        """An interval below 2 s is raised to 2 s."""
        self.assertEqual(self.poller.interval, 2.0)

    def test_changes_and_working_refresh(self):
        """Reports on change, repeats working every TTL/2, stays quiet while idle."""
        self.poller.start()
        self.assertEqual(self.reports, [])  # no transcript yet
        write_transcript(self.path, [entry("assistant", TOOL_USE)])
        self.clock.advance(2)
        self.assertEqual(self.reports, ["working"])
        self.clock.pump([2] * 14)  # 28 s later
        self.assertEqual(self.reports, ["working"])
        self.clock.advance(2)  # 30 s = TTL/2
        self.assertEqual(self.reports, ["working", "working"])
        write_transcript(self.path, [entry("assistant", TEXT)])
        self.clock.advance(2)
        self.assertEqual(self.reports, ["working", "working", "idle"])
        self.clock.pump([2] * 60)
        self.assertEqual(self.reports, ["working", "working", "idle"])
        self.poller.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reset_reports_again(self):
        """After reset (a reconnection) the current status is reported again."""
        write_transcript(self.path, [entry("assistant", TEXT)])
        self.poller.start()
        self.assertEqual(self.reports, ["idle"])
        self.poller.reset()
        self.clock.advance(2)
        self.assertEqual(self.reports, ["idle", "idle"])
        self.poller.stop()

    def test_short_ttl(self):
        """The refresh follows the broker's statusTtlSeconds (never below the poll interval)."""
        self.ttl = 10
        self.assertEqual(self.poller.refresh_every(), 5.0)
        self.ttl = 1
        self.assertEqual(self.poller.refresh_every(), 2.0)
        self.ttl = None
        self.assertEqual(self.poller.refresh_every(), 30.0)
