"""
The ids of the messages that reached one Claude Code session, on disk.

The same C{messageId} must never reach a session twice: not when the broker
pushes it again after a reconnection, and not when Claude Code restarts the
MCP server (C{/mcp}, a crash) and the broker redelivers what was not yet
acknowledged. L{DeliveredIds} remembers the last L{LIMIT} ids a session was
given, in C{<config dir>/delivered/<session key>.json} (a JSON list, 0600,
written atomically after each addition). Files not touched for
L{MAX_AGE_SECONDS} are removed when a server starts.

It records ids only, never text. (A history of messages for people to read
is another store's job.)
"""

import json
import os
import re
import time

from claudemesh.client.config import atomic_write
from claudemesh.mcpserver.local import process_start

DIRECTORY = "delivered"
LIMIT = 2000
MAX_AGE_SECONDS = 14 * 86400

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def session_key(session_id=None, claude_pid=None, proc="/proc"):
    """
    The file name (without C{.json}) for a session: its launched session id
    when it has one, else Claude Code's pid and start time.
    """
    if session_id:
        raw = "s-" + session_id
    else:
        start = process_start(claude_pid, proc) if claude_pid else None
        raw = "p-%s-%s" % (claude_pid, start or "0")
    return _UNSAFE.sub("_", raw)[:160]


class DeliveredIds:
    """
    A bounded, persistent set of message ids, oldest forgotten first; only
    in memory when C{path} is C{None}.
    """

    def __init__(self, path, limit=LIMIT):
        self.path = path
        self.limit = limit
        self._ids = {}
        for message_id in self._read():
            self._ids[message_id] = None
        self._trim()

    @classmethod
    def in_config_dir(cls, config_dir, key, limit=LIMIT, now=None):
        """
        The store of session C{key} under C{config_dir}, after removing the
        files of sessions gone for L{MAX_AGE_SECONDS}.

        @raise OSError: C{config_dir} does not exist, or is not writable.
        """
        directory = os.path.join(config_dir, DIRECTORY)
        if not os.path.isdir(directory):
            # Not makedirs: a missing config directory is not ours to make
            # (it would not get its 0700); that fails with an OSError.
            os.mkdir(directory, 0o700)
        prune(directory, time.time() if now is None else now)
        return cls(os.path.join(directory, key + ".json"), limit)

    def _read(self):
        if self.path is None:
            return []
        try:
            with open(self.path, "rb") as f:
                document = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return []
        if not isinstance(document, list):
            return []
        return [i for i in document if isinstance(i, str)]

    def _trim(self):
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, message_id):
        return message_id in self._ids

    def __len__(self):
        return len(self._ids)

    def add(self, message_id):
        """
        Remember C{message_id} and write the file. A write that fails (disk
        full, directory gone) keeps the id in memory and raises L{OSError}.
        """
        if message_id in self._ids:
            return
        self._ids[message_id] = None
        self._trim()
        if self.path is None:
            return
        data = json.dumps(list(self._ids), separators=(",", ":")).encode("utf-8")
        atomic_write(self.path, data, 0o600)


def prune(directory, now, max_age=MAX_AGE_SECONDS):
    """
    Remove the C{*.json} files of C{directory} older than C{max_age}.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime > max_age:
                os.remove(path)
        except OSError:
            pass
