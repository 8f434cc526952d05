"""
Working/idle inference from a Claude Code session's transcript (the
C{jsonl} status source, docs/claude-code.md).

Claude Code writes each session to
C{~/.claude/projects/<cwd key>/<session id>.jsonl}, one JSON object a line.
The session is working when the last C{assistant} entry asked for a tool
(C{message.content} holds a C{tool_use} item), else idle.

L{StatusInference} polls that file (never faster than every 2 s, reading
only its tail) and reports changes through a callback, repeating C{working}
every C{statusTtlSeconds}/2 so the broker does not decay a long turn to idle.
The clock is a parameter: nothing here imports the global reactor.
"""

import json
import os
import re

from twisted.logger import Logger

WORKING = "working"
IDLE = "idle"

MIN_POLL_SECONDS = 2.0
TAIL_BYTES = 8192
MAX_TAIL_BYTES = 1024 * 1024
DEFAULT_TTL_SECONDS = 60

_DRIVE = re.compile(r"\A[A-Za-z]:")
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


def project_keys(cwd):
    """
    The directory names under C{~/.claude/projects/} that may hold the
    transcripts of sessions started in C{cwd}, most likely first,
    de-duplicated:

      1. every C{/}, C{\\} and C{:} replaced by C{-};
      2. only C{/} replaced;
      3. C{/} and C{\\} replaced;
      4. a leading drive letter C{X:} dropped, then C{/} and C{\\} replaced;
      5. C{-} + each candidate so far that does not start with C{-};
      6. every character that is not an ASCII letter or digit replaced by
         C{-} (what current Claude Code writes: C{/a/my.app} → C{-a-my-app}).

    Rules 1-5 are the original's; 6 is ours.
    """
    candidates = [
        re.sub(r"[/\\:]", "-", cwd),
        cwd.replace("/", "-"),
        re.sub(r"[/\\]", "-", cwd),
        re.sub(r"[/\\]", "-", _DRIVE.sub("", cwd, count=1)),
    ]
    candidates += ["-" + c for c in list(candidates) if not c.startswith("-")]
    candidates.append(_NOT_ALNUM.sub("-", cwd))
    seen = []
    for c in candidates:
        if c and c not in seen:
            seen.append(c)
    return seen


def projects_dir(environ=None):
    """
    C{~/.claude/projects} (C{~} is C{$HOME}).
    """
    environ = os.environ if environ is None else environ
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".claude", "projects")


def project_dir(cwd, root):
    """
    The first candidate directory of L{project_keys} that exists under
    C{root}, or C{None}.
    """
    for key in project_keys(cwd):
        path = os.path.join(root, key)
        if os.path.isdir(path):
            return path
    return None


def newest_transcript(directory):
    """
    The most recently modified C{*.jsonl} file of C{directory}, or C{None}.
    """
    best, best_mtime = None, None
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in names:
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(directory, name)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            continue
        if best_mtime is None or mtime > best_mtime:
            best, best_mtime = path, mtime
    return best


def find_transcript(cwd, session_id=None, root=None):
    """
    The transcript of the session: C{<session id>.jsonl} when the session id
    is known (set by C{claudemesh launch}), else the newest transcript of the
    project directory. C{None} when there is none (yet).
    """
    root = projects_dir() if root is None else root
    if session_id:
        for key in project_keys(cwd):
            path = os.path.join(root, key, session_id + ".jsonl")
            if os.path.isfile(path):
                return path
        return None
    directory = project_dir(cwd, root)
    return newest_transcript(directory) if directory else None


def detect_session_id(cwd, root=None):
    """
    The id of the newest transcript for C{cwd} (a hint only: it may be an
    earlier session's), or C{None}.
    """
    path = find_transcript(cwd, None, root)
    if path is None:
        return None
    return os.path.basename(path)[: -len(".jsonl")]


def status_of_lines(lines):
    """
    The status the transcript lines say, scanning from the end for the last
    C{assistant} entry with a C{message.content} list: C{working} when it
    holds a C{tool_use}, else C{idle}. C{None} when no such entry is there.
    """
    for line in reversed(lines):
        if b'"assistant"' not in line:
            continue
        try:
            entry = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(entry, dict) or entry.get("type") != "assistant":
            continue
        message = entry.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        return WORKING if any(isinstance(item, dict) and item.get("type") == "tool_use"
                              for item in content) else IDLE
    return None


def infer_status(path, tail_bytes=TAIL_BYTES, max_tail_bytes=MAX_TAIL_BYTES):
    """
    Read the tail of transcript C{path} and infer its status. The window
    starts at C{tail_bytes} and doubles (up to C{max_tail_bytes}) while it
    holds no complete assistant entry, so a huge last entry is still seen.
    A transcript without an assistant entry is C{idle}; an unreadable one
    is C{None}.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            window = tail_bytes
            while True:
                start = max(0, size - window)
                f.seek(start)
                data = f.read(size - start)
                lines = data.split(b"\n")
                if start > 0:
                    lines = lines[1:]  # probably cut
                status = status_of_lines(lines)
                if status is not None:
                    return status
                if start == 0 or window >= max_tail_bytes:
                    return IDLE
                window *= 2
    except OSError:
        return None


class StatusInference:
    """
    Poll a session's transcript and report its status.

    @ivar report: called with C{"working"} or C{"idle"} on every change, and
        again with C{"working"} every C{ttl}/2 seconds while working.
    """

    _log = Logger()

    def __init__(self, clock, cwd, report, session_id=None, root=None,
                 interval=MIN_POLL_SECONDS, ttl=lambda: DEFAULT_TTL_SECONDS):
        """
        @param ttl: a callable giving the broker's C{statusTtlSeconds} (it
            comes with each C{hello_ack}).
        """
        self._clock = clock
        self.cwd = cwd
        self.report = report
        self.session_id = session_id
        self.root = projects_dir() if root is None else root
        self.interval = max(MIN_POLL_SECONDS, interval)
        self._ttl = ttl
        self.status = None
        self.path = None
        self._sent_at = None
        self._call = None

    def start(self):
        if self._call is None:
            self.poll()

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def reset(self):
        """
        Forget what was reported (after a reconnection: the broker starts
        the new session idle), so the next poll reports again.
        """
        self.status = None
        self._sent_at = None

    def refresh_every(self):
        try:
            ttl = float(self._ttl() or DEFAULT_TTL_SECONDS)
        except (TypeError, ValueError):
            ttl = DEFAULT_TTL_SECONDS
        return max(MIN_POLL_SECONDS, ttl / 2.0)

    def poll(self):
        self._call = self._clock.callLater(self.interval, self.poll)
        try:
            self.path = find_transcript(self.cwd, self.session_id, self.root)
            status = infer_status(self.path) if self.path else None
        except Exception:
            self._log.failure("transcript inference failed")
            return
        if status is None:
            return
        now = self._clock.seconds()
        due = (status == WORKING and self._sent_at is not None
               and now - self._sent_at >= self.refresh_every() - 0.001)
        if status != self.status or due:
            self.status = status
            self._sent_at = now
            try:
                self.report(status)
            except Exception:
                self._log.failure("reporting the transcript status failed")
