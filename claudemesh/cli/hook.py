"""
C{claudemesh hook <idle|working|dnd>}: Claude Code's hooks run this on every
prompt (C{UserPromptSubmit} → working), at the end of every turn (C{Stop},
C{StopFailure} → idle) and when a session starts (C{SessionStart} → idle),
so it must be fast and must never get in the way.

It reads the hook's JSON from stdin (at most 256 KiB, at most 0.5 s) and
asks the MCP server of its own Claude Code session, over that server's
local socket (L{claudemesh.mcpserver.local}), what to print: pending mesh
messages as C{additionalContext} (C{UserPromptSubmit}), the reason to go on
before stopping (C{Stop}), who and where you are (C{SessionStart}). That
server also posts the status to the brokers, after answering; the hook does
not wait for it.

When no MCP server answers (it is not running, or not yet), the hook posts
C{{cwd, pid, status, session_id}} to C{POST /hook/set-status} of each joined
mesh's broker itself, signed by that mesh's member key (docs/protocol.md, signed strings), all
meshes in parallel, each with a 1 s timeout: C{cwd} from the JSON (else
C{$CLAUDE_PROJECT_DIR}, else the current directory), C{session_id} from it
(else C{$CLAUDEMESH_SESSION_ID}). C{pid} is Claude Code's, the pid the MCP
server puts in its hello: this process's parent when the command was run
with C{exec}, else the parent of the shell (L{local.claude_code_pid}).

It always exits 0 and prints nothing but the hook's JSON, except debug
lines on stderr with C{CLAUDEMESH_HOOK_DEBUG=1}. Imports stay light on
purpose: the standard library (C{socket}, C{json}; C{http.client} for
HTTPS only), and PyNaCl (through L{claudemesh.crypto}) only to sign a post
of its own; no Twisted, Autobahn or MCP SDK.
"""

import json
import os
import sys
import time

from claudemesh.mcpserver import local

STATUSES = ("idle", "working", "dnd")
MAX_STDIN_BYTES = 256 * 1024
STDIN_SECONDS = 0.5
POST_TIMEOUT = 1.0
TOTAL_SECONDS = 2.0
HOOK_PATH = "/hook/set-status"


def _debug_enabled(environ):
    return environ.get("CLAUDEMESH_HOOK_DEBUG", "") in ("1", "true")


def read_stdin(stream=None, limit=MAX_STDIN_BYTES, seconds=STDIN_SECONDS):
    """
    Up to C{limit} bytes of C{stream} (stdin), waiting at most C{seconds}
    in all; nothing from a terminal.
    """
    import select

    stream = sys.stdin if stream is None else stream
    try:
        fd = stream.fileno()
        if os.isatty(fd):
            return b""
    except (AttributeError, OSError, ValueError):
        return b""
    deadline = time.monotonic() + seconds
    chunks, size = [], 0
    while size < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            ready, _, _ = select.select([fd], [], [], left)
        except (OSError, ValueError):
            break
        if not ready:
            break
        try:
            chunk = os.read(fd, min(65536, limit - size))
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def parse_payload(raw):
    try:
        payload = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def request_body(status, payload, environ, pid):
    """
    The JSON body: C{{cwd, pid, status, session_id?}}.
    """
    cwd = payload.get("cwd")
    if not isinstance(cwd, str) or not cwd:
        cwd = environ.get("CLAUDE_PROJECT_DIR") or os.getcwd()
    body = {"cwd": cwd, "pid": pid, "status": status}
    session_id = payload.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        session_id = environ.get("CLAUDEMESH_SESSION_ID") or ""
    if session_id and len(session_id) <= 128:
        body["session_id"] = session_id
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def joined_meshes(environ, with_names=False):
    """
    C{[(meshId, pubkey, secretKey, brokerUrl)]} from the config, read
    without the client library (which would cost imports); C{[]} when there
    is nothing usable. C{with_names} adds the slug and display name.
    """
    directory = environ.get("CLAUDEMESH_CONFIG_DIR")
    if directory:
        directory = os.path.abspath(os.path.expanduser(directory))
    else:
        directory = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".claudemesh")
    try:
        with open(os.path.join(directory, "config.json"), "rb") as f:
            document = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    meshes = document.get("meshes") if isinstance(document, dict) else None
    found = []
    for m in meshes if isinstance(meshes, list) else []:
        if not isinstance(m, dict):
            continue
        fields = [m.get(k) for k in ("meshId", "pubkey", "secretKey", "brokerUrl")]
        if all(isinstance(v, str) and v for v in fields):
            if with_names:
                fields += [str(m.get("slug") or m["meshId"]), m.get("displayName") or ""]
            found.append(tuple(fields))
    return found


def http_target(broker_url):
    """
    C{(scheme, host, port)} of the broker's HTTP side (ws→http, wss→https).
    """
    from urllib.parse import urlsplit

    parts = urlsplit(broker_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError("not a ws:// or wss:// URL: %r" % (broker_url,))
    return scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80)


def signed_headers(mesh_id, pubkey, secret_key, body, now_ms):
    from claudemesh import crypto

    identity = crypto.Identity.from_secret_hex(secret_key)
    signature = identity.sign(crypto.hook_string(mesh_id, now_ms, body))
    return {
        "Content-Type": "application/json",
        "X-Claudemesh-Mesh": mesh_id,
        "X-Claudemesh-Pubkey": pubkey,
        "X-Claudemesh-Timestamp": str(now_ms),
        "X-Claudemesh-Signature": signature,
    }


def post(broker_url, headers, body, timeout=POST_TIMEOUT):
    """
    POST the hook request; returns C{(status, response text)}. Plain HTTP is
    written on a socket (C{http.client} would import C{email} and C{ssl},
    a third of the hook's run time); HTTPS goes through C{http.client}.
    """
    scheme, host, port = http_target(broker_url)
    if scheme == "https":
        import http.client

        conn = http.client.HTTPSConnection(host, port, timeout=timeout)
        try:
            conn.request("POST", HOOK_PATH, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(4096).decode("utf-8", "replace")
        finally:
            conn.close()
    return _post_plain(host, port, headers, body, timeout)


def _post_plain(host, port, headers, body, timeout):
    import socket

    authority = "[%s]" % (host,) if ":" in host else host
    if port != 80:
        authority += ":%d" % (port,)
    lines = ["POST %s HTTP/1.1" % (HOOK_PATH,), "Host: " + authority,
             "Content-Length: %d" % (len(body),), "Connection: close"]
    lines += ["%s: %s" % (k, v) for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        conn.sendall(request)
        chunks, size = [], 0
        while size < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
    response = b"".join(chunks)
    head, _, rest = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError("not an HTTP response")
    return int(status_line[1]), rest.decode("utf-8", "replace")


def _complete(response):
    """
    Has the whole body of C{response} (with a Content-Length) arrived?
    """
    head, _, rest = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(rest) >= int(value.strip())
    return False


def report(status, payload, environ, pid, debug=None):
    """
    Post C{status} to every joined mesh, in parallel, bounded in time.
    Returns C{[(meshId, outcome)]} (for debugging and tests).
    """
    import threading

    debug = debug or (lambda text: None)
    meshes = joined_meshes(environ)
    if not meshes:
        debug("no joined meshes")
        return []
    body = request_body(status, payload, environ, pid)
    now_ms = int(time.time() * 1000)
    outcomes = {}

    def one(mesh_id, pubkey, secret_key, broker_url):
        try:
            headers = signed_headers(mesh_id, pubkey, secret_key, body, now_ms)
            outcomes[mesh_id] = post(broker_url, headers, body)
        except Exception as e:
            outcomes[mesh_id] = "%s: %s" % (type(e).__name__, e)

    threads = [threading.Thread(target=one, args=m, daemon=True) for m in meshes]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TOTAL_SECONDS
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    results = [(m[0], outcomes.get(m[0], "timed out")) for m in meshes]
    for mesh_id, outcome in results:
        debug("%s: %s" % (mesh_id, outcome))
    return results


def session_start_context(environ):
    """
    The C{SessionStart} context when no MCP server answered (it may not be
    up yet): the joined meshes from the config.
    """
    names = [(m[4], m[5]) for m in joined_meshes(environ, with_names=True)]
    if not names:
        return None
    where = ", ".join('mesh %s as "%s"' % (slug, name) if name else "mesh %s" % (slug,)
                      for slug, name in names)
    return ("claudemesh: this session is on %s. The claudemesh tools (list_peers, "
            "send_message, check_messages) show who is online and talk to them. Messages "
            "from mesh peers come from other sessions or people, not from your user." % (where,))


def write_output(output, stream=None):
    stream = sys.stdout if stream is None else stream
    stream.write(json.dumps(output, ensure_ascii=False, separators=(",", ":")) + "\n")
    stream.flush()


def main(argv, environ=None):
    """
    The hook entry point; returns 0 whatever happens.
    """
    environ = os.environ if environ is None else environ
    started = time.monotonic()
    enabled = _debug_enabled(environ)

    def debug(text):
        if enabled:
            sys.stderr.write("[claudemesh hook] %s\n" % (text,))
            sys.stderr.flush()

    try:
        status = argv[0] if argv else None
        if status not in STATUSES:
            debug("ignoring status %r" % (status,))
            return 0
        payload = parse_payload(read_stdin())
        event = payload.get("hook_event_name")
        event = event if isinstance(event, str) else ""
        claude_pid = local.claude_code_pid()
        answer = local.ask(local.socket_path(environ, claude_pid),
                           {"op": "hook", "event": event, "status": status, "payload": payload})
        if answer is not None:
            debug("answered by the MCP server of Claude Code %d" % (claude_pid,))
            output = answer.get("output")
            if isinstance(output, dict):
                write_output(output)
        else:
            debug("no MCP server for Claude Code %d; posting to the brokers" % (claude_pid,))
            if event == "SessionStart":
                text = session_start_context(environ)
                if text:
                    write_output({"hookSpecificOutput": {"hookEventName": event,
                                                         "additionalContext": text}})
            report(status, payload, environ, claude_pid, debug)
    except BaseException as e:  # never in Claude Code's way, not even on Ctrl-C
        debug("failed: %s: %s" % (type(e).__name__, e))
    debug("done in %.1f ms" % ((time.monotonic() - started) * 1000,))
    return 0
