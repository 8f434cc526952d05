"""
The local history of what this machine's claudemesh sessions sent and
received, so C{claudemesh ui} can show the conversations the user's Claude
Code sessions had (docs/ui.md).

Every client session that opens messages writes here: the MCP server, the
CLI (C{listen}, C{inbox}, C{send}) and the UI itself, each through its
L{claudemesh.client.connection.MeshClient} (C{history=}). Layout::

    <config dir>/history/            mode 0700
        <meshId>.jsonl               mode 0600, one JSON record a line
        <meshId>.lock                the lock every writer takes (flock)

Records are C{{v: 1, kind: "sent" | "received", at, via, sessionId, meshId,
messageId, senderPubkey, senderMemberPubkey, targetSpec, priority, text,
...}} (C{at} is this machine's time in ms). The file holds plaintext: it is
as private as C{config.json}, which holds the keys.

Bounds: when an append takes a file past C{max_bytes} (default 4 MiB), the
writer rewrites it, under the lock, keeping the newest records that fit in
half of that and are younger than C{max_age} (default 30 days); readers skip
older records. Several processes append at once: each append is one
C{write} on a descriptor opened for appending under an exclusive C{flock},
and a rewrite replaces the file by a rename, which L{HistoryTail} notices.

Writing the history never breaks messaging: a failed write is logged
(without the text) and dropped.
"""

import fcntl
import hashlib
import json
import os
import re
import time

from twisted.logger import Logger

from claudemesh.client import config as configuration

HISTORY_DIR = "history"
VERSION = 1
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_AGE_DAYS = 30
# The fewest bytes a history may be limited to (the variable below).
MIN_MAX_BYTES = 64 * 1024

_SAFE_NAME = re.compile(r"\A[A-Za-z0-9_-]{1,128}\Z")
_log = Logger()


def from_environ(environ, via, clock=time.time):
    """
    The L{History} of this machine's config directory for a session of kind
    C{via} (C{mcp}, C{cli}, C{ui}), or C{None} when C{$CLAUDEMESH_HISTORY}
    is C{off}. C{$CLAUDEMESH_HISTORY_MAX_BYTES} and
    C{$CLAUDEMESH_HISTORY_DAYS} change the bounds (unreadable values are
    ignored).
    """
    if (environ.get("CLAUDEMESH_HISTORY") or "").strip().lower() in ("off", "0", "no", "false"):
        return None
    max_bytes = _positive(environ.get("CLAUDEMESH_HISTORY_MAX_BYTES"), DEFAULT_MAX_BYTES)
    days = _positive(environ.get("CLAUDEMESH_HISTORY_DAYS"), DEFAULT_MAX_AGE_DAYS)
    return History(configuration.config_dir(environ), via, clock=clock,
                   max_bytes=max(max_bytes, MIN_MAX_BYTES), max_age=days * 86400)


def _positive(text, default):
    try:
        value = int(text)
    except (TypeError, ValueError):
        return default
    return value if value > 0 else default


class History:
    """
    The history files of one config directory, written as session kind
    C{via}.
    """

    def __init__(self, directory, via, clock=time.time, max_bytes=DEFAULT_MAX_BYTES,
                 max_age=DEFAULT_MAX_AGE_DAYS * 86400):
        """
        @param directory: the claudemesh config directory.
        @param clock: seconds since the epoch (C{time.time}, or a reactor's
            C{seconds}).
        @param max_age: seconds a record is kept.
        """
        self.directory = os.path.join(directory, HISTORY_DIR)
        self.via = via
        self.clock = clock
        self.max_bytes = max_bytes
        self.max_age = max_age

    def path(self, mesh_id):
        return os.path.join(self.directory, mesh_file_name(mesh_id) + ".jsonl")

    def _now_ms(self):
        return int(self.clock() * 1000)

    # -- writing -----------------------------------------------------------------

    def append(self, mesh_id, record):
        """
        Add C{record} (a JSON-able dict) to the history of C{mesh_id},
        stamped with C{v}, C{at}, C{via} and C{meshId} unless it has them.
        """
        document = {"v": VERSION, "at": self._now_ms(), "via": self.via, "meshId": mesh_id}
        document.update(record)
        line = (json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n")
        data = line.encode("utf-8")
        configuration.ensure_dir(self.directory)
        with self._locked(mesh_id):
            fd = os.open(self.path(mesh_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > self.max_bytes:
                self._compact(mesh_id)

    def note_sent(self, client, target_spec, text, priority, ack):
        """
        Record a message C{client} sent and the broker queued.
        """
        self._safely(client.mesh.meshId, {
            "kind": "sent", "sessionId": client.session_id,
            "messageId": ack.get("messageId"), "id": ack.get("id"),
            "senderPubkey": client.pubkey, "senderMemberPubkey": client.identity.pubkey,
            "targetSpec": target_spec, "priority": priority, "text": text})

    def note_received(self, client, inbound):
        """
        Record a message push C{client} opened (or failed to open) and
        handed to its application.
        """
        record = inbound.to_json()
        record.pop("meshId", None)
        record.update({"kind": "received", "sessionId": client.session_id})
        self._safely(client.mesh.meshId, record)

    def _safely(self, mesh_id, record):
        try:
            self.append(mesh_id, record)
        except (OSError, ValueError, TypeError) as e:
            # Never the record itself: it holds plaintext.
            _log.warn("could not write the message history ({error})",
                      error=type(e).__name__ + (": " + e.strerror if getattr(
                          e, "strerror", None) else ""))

    def _locked(self, mesh_id):
        return FileLock(os.path.join(self.directory, mesh_file_name(mesh_id) + ".lock"))

    def _compact(self, mesh_id):
        """
        Rewrite the history of C{mesh_id} to its newest records within half
        of C{max_bytes} and C{max_age}. Called with the lock held.
        """
        path = self.path(mesh_id)
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        horizon = self._now_ms() - self.max_age * 1000
        kept, total = [], 0
        for line in reversed(lines):
            record = _parse(line)
            if record is None or record.get("at", 0) < horizon:
                continue
            if total + len(line) > self.max_bytes // 2:
                break
            kept.append(line)
            total += len(line)
        kept.reverse()
        configuration.atomic_write(path, b"".join(kept))

    # -- reading -----------------------------------------------------------------

    def read(self, mesh_id):
        """
        Every record of C{mesh_id} younger than C{max_age}, oldest first.
        """
        return self.tail(mesh_id).poll()

    def tail(self, mesh_id):
        return HistoryTail(self, mesh_id)


class HistoryTail:
    """
    Reads a mesh's history as it grows: L{poll} returns the records written
    since the last call (all of them the first time, and again after a
    rewrite).
    """

    def __init__(self, history, mesh_id):
        self.history = history
        self.mesh_id = mesh_id
        self._identity = None
        self._offset = 0
        self._partial = b""
        self.rewritten = False

    def poll(self):
        """
        The new records, oldest first. C{rewritten} tells whether the file
        was replaced since the last poll (the caller then has everything
        again).
        """
        self.rewritten = False
        path = self.history.path(self.mesh_id)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return []
        with f:
            stat = os.fstat(f.fileno())
            identity = (stat.st_dev, stat.st_ino)
            if identity != self._identity or stat.st_size < self._offset:
                self.rewritten = self._identity is not None
                self._identity, self._offset, self._partial = identity, 0, b""
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        # A line without its newline yet is being written: keep it for later.
        self._partial = lines.pop()
        horizon = self.history._now_ms() - self.history.max_age * 1000
        records = []
        for line in lines:
            record = _parse(line)
            if record is not None and record.get("at", 0) >= horizon:
                records.append(record)
        return records


class FileLock:
    """
    An exclusive C{flock} on a lock file, for a C{with} (the history's, and
    the mesh key rings' of L{claudemesh.client.meshkeys}).
    """

    def __init__(self, path):
        self.path = path
        self._fd = None

    def __enter__(self):
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False


def mesh_file_name(mesh_id):
    """
    A file name for C{mesh_id}'s files: the id itself when it is a safe
    name, else its SHA-256.
    """
    if _SAFE_NAME.match(mesh_id or ""):
        return mesh_id
    return hashlib.sha256((mesh_id or "").encode("utf-8")).hexdigest()


def _parse(line):
    """
    One history line as a record, or C{None} for anything else (a torn or
    foreign line is skipped, never fatal).
    """
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("v") != VERSION:
        return None
    if record.get("kind") not in ("sent", "received"):
        return None
    if not isinstance(record.get("at"), int) or isinstance(record.get("at"), bool):
        return None
    return record
