"""
The local channel between a Claude Code session's MCP server and the
commands Claude Code runs for that session (C{claudemesh hook},
C{claudemesh statusline}).

The MCP server listens on a Unix socket that only the user can open:
C{<runtime dir>/cc-<Claude Code pid>.sock}, mode 0600, in a directory of
mode 0700 owned by the user (L{runtime_dir}). A hook finds it through its
own Claude Code pid (L{claude_code_pid}), sends one JSON line and reads one
JSON line back (L{ask}). Nothing goes to a broker on this path, so a hook
stays fast when the broker is down.

Requests: C{{"op": "hook", "event": <hook_event_name>, "status":
idle|working|dnd|null, "payload": <the hook's JSON>}} → C{{"output": <JSON
for the hook to print> | null}}; C{{"op": "statusline"}} → C{{"line":
"..."}}.

This module is imported by the hook on every prompt: standard library only.
"""

import json
import os
import socket
import stat
import time

RUNTIME_VARIABLE = "CLAUDEMESH_RUNTIME_DIR"
MAX_LINE_BYTES = 256 * 1024
ASK_SECONDS = 0.5

# When a hook command is not installed with `exec`, its parent is the shell
# Claude Code ran it with; Claude Code is the shell's parent.
SHELLS = frozenset(["sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish"])


class RuntimeDirError(Exception):
    """
    The runtime directory is not private to this user; the message says why.
    """


def runtime_dir(environ=None):
    """
    C{$CLAUDEMESH_RUNTIME_DIR}, else C{$XDG_RUNTIME_DIR/claudemesh}, else
    C{/tmp/claudemesh-<uid>}. Kept short on purpose: a Unix socket path
    holds at most ~104 bytes.
    """
    environ = os.environ if environ is None else environ
    if environ.get(RUNTIME_VARIABLE):
        return os.path.abspath(environ[RUNTIME_VARIABLE])
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "claudemesh")
    return "/tmp/claudemesh-%d" % (os.getuid(),)


def ensure_runtime_dir(path):
    """
    Make C{path} (mode 0700) if needed and check that it belongs to this
    user and nobody else can enter it.

    @raise RuntimeDirError: it is someone else's, or open to others.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as e:
        raise RuntimeDirError("cannot make %s: %s" % (path, e.strerror or e)) from None
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError("%s is not a directory" % (path,))
    if info.st_uid != os.getuid():
        raise RuntimeDirError("%s belongs to another user" % (path,))
    if info.st_mode & 0o077:
        raise RuntimeDirError("%s is open to other users (mode %04o)"
                              % (path, stat.S_IMODE(info.st_mode)))
    return path


def socket_path(environ, claude_pid):
    return os.path.join(runtime_dir(environ), "cc-%d.sock" % (claude_pid,))


def proc_stat(pid, proc="/proc"):
    """
    C{(command name, [the fields after it])} of C{/proc/<pid>/stat};
    C{(None, [])} where there is no such file.
    """
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None, []
    # The name (field 2) may hold spaces and parentheses: the other fields
    # start behind the last ")".
    return data[data.find("(") + 1:data.rfind(")")], data[data.rfind(")") + 1:].split()


def process_start(pid, proc="/proc"):
    """
    When process C{pid} started (clock ticks since boot), to tell a Claude
    Code from a later process that got the same pid; C{None} without
    C{/proc}.
    """
    fields = proc_stat(pid, proc)[1]
    return fields[19] if len(fields) > 19 else None


def claude_code_pid(parent=None, proc="/proc"):
    """
    The pid of the Claude Code this process runs under: its parent, or the
    parent's parent when the parent is a shell (a hook command run through
    C{/bin/sh -c} without C{exec}).
    """
    parent = os.getppid() if parent is None else parent
    name, fields = proc_stat(parent, proc)
    if name in SHELLS and len(fields) > 1 and fields[1].isdigit() and int(fields[1]) > 1:
        return int(fields[1])
    return parent


def ask(path, request, seconds=ASK_SECONDS):
    """
    Send C{request} (a dict) to the MCP server at C{path} and return its
    answer (a dict); C{None} when nobody answers in C{seconds}, or answers
    something that is not a JSON object.
    """
    deadline = time.monotonic() + seconds
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        conn.settimeout(seconds)
        conn.connect(path)
        conn.sendall(json.dumps(request, separators=(",", ":")).encode("utf-8") + b"\n")
        chunks, size = [], 0
        while size <= MAX_LINE_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if b"\n" in chunk:
                break
        line = b"".join(chunks).split(b"\n", 1)[0]
        answer = json.loads(line.decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        conn.close()
    return answer if isinstance(answer, dict) else None
