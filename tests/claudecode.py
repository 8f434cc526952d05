"""
What the real-Claude-Code test (tests/test_claude_code.py) runs Claude Code
with: the pinned npm package installed into a cache directory, a loopback
stand-in for the Messages API, and an interactive session under a pty that
answers the terminal's queries.

- L{install_claude_code}: C{npm install @anthropic-ai/claude-code@<pin>}
  into C{$CLAUDEMESH_TEST_CACHE} (default C{~/.cache/claudemesh-tests}),
  once; returns the C{claude} executable.
- L{FakeMessagesAPI}: C{POST /v1/messages} on 127.0.0.1, streaming
  server-sent events as the real API does (or one JSON body when the
  request does not stream). Every request is recorded. By default it
  answers a short text; L{FakeMessagesAPI.script} lets a test choose the
  answer for the request whose last user text contains a marker: a text, a
  tool call, or a slow text (a turn that stays busy).
- L{ClaudeTerminal}: C{claude} (or C{claudemesh launch}) on a pty, a
  thread reading the screen and answering cursor-position, device
  attribute and colour queries, C{type()} to send keys.
"""

import http.server
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import threading
import time

CLAUDE_CODE_PACKAGE = "@anthropic-ai/claude-code"
CLAUDE_CODE_VERSION = "2.1.332"
MODEL = "claude-sonnet-4-5-20250929"


class Unavailable(Exception):
    """
    Claude Code cannot be installed here; the message says why.
    """


def cache_dir(environ=None):
    environ = os.environ if environ is None else environ
    return environ.get("CLAUDEMESH_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "claudemesh-tests")


def install_claude_code(version=CLAUDE_CODE_VERSION, environ=None, timeout=600):
    """
    The path of the C{claude} executable of C{version}, installed with npm
    into the cache directory when it is not there yet.

    @raise Unavailable: no npm, or the install failed.
    """
    prefix = os.path.join(cache_dir(environ), "claude-code-%s" % (version,))
    found = _installed(prefix, version)
    if found:
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (the real Claude Code test needs it to "
                          "install %s@%s)" % (CLAUDE_CODE_PACKAGE, version))
    os.makedirs(prefix, exist_ok=True)
    # --ignore-scripts: the package's postinstall only copies the native
    # binary of the platform package over a stub, and needs a newer Node
    # than some distributions have; the binary is used where it is.
    command = [npm, "install", "--no-audit", "--no-fund", "--no-save", "--ignore-scripts",
               "--prefix", prefix, "%s@%s" % (CLAUDE_CODE_PACKAGE, version)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable("npm install %s@%s failed: %s" % (CLAUDE_CODE_PACKAGE, version,
                                                            e)) from None
    if done.returncode != 0:
        raise Unavailable("npm install %s@%s failed: %s" % (
            CLAUDE_CODE_PACKAGE, version, (done.stderr or done.stdout)[-2000:]))
    found = _installed(prefix, version)
    if not found:
        raise Unavailable("the installed %s@%s does not run here" % (CLAUDE_CODE_PACKAGE,
                                                                     version))
    return found


def _installed(prefix, version):
    """
    The runnable C{claude} of C{version} under C{prefix}: the platform
    package's native binary, or the wrapper's when its postinstall ran.
    """
    scope = os.path.join(prefix, "node_modules", "@anthropic-ai")
    candidates = [os.path.join(scope, name, "claude") for name in
                  (sorted(os.listdir(scope)) if os.path.isdir(scope) else [])
                  if name.startswith("claude-code-")]
    candidates.append(os.path.join(prefix, "node_modules", ".bin", "claude"))
    for candidate in candidates:
        if os.path.isfile(candidate) and _runs(candidate, version):
            return candidate
    return None


def _runs(claude, version):
    try:
        done = subprocess.run([claude, "--version"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and done.stdout.startswith(version)


# -- the Messages API stand-in -------------------------------------------------------------


def _sse(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data))).encode("utf-8")


def text_of(content):
    """
    All the text of a message's C{content} (a string or blocks, tool
    results included).
    """
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            parts.append(text_of(block.get("content")))
    return "\n".join(parts)


class Answer:
    """
    What the stand-in answers one request with.

    @ivar text: the text of the answer (after the tool call, if any).
    @ivar tool: C{(name, input)} of a tool call, or C{None}.
    @ivar seconds: how long to take to stream it (a busy turn).
    """

    def __init__(self, text="ok", tool=None, seconds=0.0):
        self.text = text
        self.tool = tool
        self.seconds = seconds


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw.decode("utf-8")) if raw else {}
        except ValueError:
            return {}

    def _json(self, status, document):
        data = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.api.record(self.command, self.path, {})
        self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                     "message": "not here"}})

    def do_POST(self):
        body = self._body()
        api = self.server.api
        entry = api.record(self.command, self.path, body)
        if not self.path.startswith("/v1/messages"):
            self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                         "message": "not here"}})
            return
        if self.path.startswith("/v1/messages/count_tokens"):
            self._json(200, {"input_tokens": 100})
            return
        answer = api.answer_for(entry)
        if body.get("stream"):
            try:
                self._stream(answer)
            except (BrokenPipeError, ConnectionResetError):
                # Claude Code dropped the request in flight (a `now` message
                # interrupts it): as the real API sees it.
                entry["interrupted"] = True
        else:
            content = []
            if answer.tool:
                content.append({"type": "tool_use", "id": api.tool_id(), "name": answer.tool[0],
                                "input": answer.tool[1]})
            else:
                content.append({"type": "text", "text": answer.text})
            self._json(200, {"id": "msg_%d" % (entry["n"],), "type": "message",
                             "role": "assistant", "model": body.get("model") or MODEL,
                             "content": content,
                             "stop_reason": "tool_use" if answer.tool else "end_turn",
                             "stop_sequence": None,
                             "usage": {"input_tokens": 100, "output_tokens": 10}})

    def _stream(self, answer):
        api = self.server.api
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        write = self.wfile.write
        write(_sse("message_start", {"type": "message_start", "message": {
            "id": "msg_%d" % (api.count(),), "type": "message", "role": "assistant",
            "model": MODEL, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 100, "output_tokens": 1}}}))
        if answer.tool:
            name, arguments = answer.tool
            write(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "tool_use",
                                                                 "id": api.tool_id(),
                                                                 "name": name, "input": {}}}))
            write(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": json.dumps(arguments)}}))
            write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
            stop = "tool_use"
        else:
            write(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}))
            words = answer.text.split(" ")
            pause = answer.seconds / max(1, len(words))
            for n, word in enumerate(words):
                if pause:
                    self.wfile.flush()
                    time.sleep(pause)
                write(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": word + (" " if n < len(words) - 1
                                                                    else "")}}))
            write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
            stop = "end_turn"
        write(_sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": 10}}))
        write(_sse("message_stop", {"type": "message_stop"}))
        self.wfile.flush()


class FakeMessagesAPI:
    """
    The Messages API on a free port of 127.0.0.1, in a thread.

    @ivar requests: every request, in order: C{{n, method, path, body,
        at}}.
    """

    def __init__(self):
        self.requests = []
        self.scripts = []  # [(marker, Answer, used?)]
        self._lock = threading.Lock()
        self._tools = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.api = self
        self.url = "http://127.0.0.1:%d" % (self.server.server_address[1],)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def count(self):
        return len(self.requests)

    def tool_id(self):
        with self._lock:
            self._tools += 1
            return "toolu_%04d" % (self._tools,)

    def record(self, method, path, body):
        with self._lock:
            entry = {"n": len(self.requests) + 1, "method": method, "path": path,
                     "body": body, "at": time.monotonic()}
            self.requests.append(entry)
            return entry

    def script(self, marker, answer):
        """
        Answer the first conversation request whose last user text contains
        C{marker} with C{answer} (once).
        """
        with self._lock:
            self.scripts.append([marker, answer, False])

    def answer_for(self, entry):
        last = last_user_text(entry["body"])
        if is_conversation(entry["body"]):
            with self._lock:
                for script in self.scripts:
                    marker, answer, used = script
                    if not used and marker in last:
                        script[2] = True
                        return answer
        return Answer("ok")

    def conversation(self):
        """
        The requests of the session's main conversation (those that offer
        the session's tools), in order.
        """
        return [r for r in list(self.requests) if is_conversation(r["body"])]


def is_conversation(body):
    """
    Is this a request of the main conversation (it offers tools), not one
    of Claude Code's side requests (titles, summaries, quota checks)?
    """
    return bool(body.get("tools")) and bool(body.get("messages"))


def last_user_text(body):
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def visible_text(body):
    """
    Everything the model reads in a request: the system prompt (where
    Claude Code puts hook context) and every message.
    """
    system = body.get("system")
    parts = [text_of(system) if isinstance(system, list) else (system or "")]
    parts += [text_of(m.get("content")) for m in body.get("messages") or []]
    return "\n".join(parts)


def user_texts(body):
    """
    The text of each user message of a request, in order.
    """
    return [text_of(m.get("content")) for m in body.get("messages") or []
            if m.get("role") == "user"]


# -- the terminal ----------------------------------------------------------------------------

# Queries a full-screen terminal program sends, and what a terminal answers.
_QUERIES = [
    (re.compile(rb"\x1b\[6n"), lambda m: b"\x1b[1;1R"),
    (re.compile(rb"\x1b\[\?6n"), lambda m: b"\x1b[?1;1R"),
    (re.compile(rb"\x1b\[>0?c"), lambda m: b"\x1b[>0;276;0c"),
    (re.compile(rb"\x1b\[0?c"), lambda m: b"\x1b[?62;22c"),
    (re.compile(rb"\x1b\]1([01]);\?(\x07|\x1b\\)"),
     lambda m: b"\x1b]1" + m.group(1) + b";rgb:0000/0000/0000" + m.group(2)),
    (re.compile(rb"\x1b\[\?u"), lambda m: b"\x1b[?0u"),
    (re.compile(rb"\x1b\[>q"), lambda m: b"\x1bP>|xterm(370)\x1b\\"),
    (re.compile(rb"\x1b\[\?(\d+)\$p"), lambda m: b"\x1b[?" + m.group(1) + b";2$y"),
    (re.compile(rb"\x1b\[14t"), lambda m: b"\x1b[4;800;1200t"),
    (re.compile(rb"\x1b\[18t"), lambda m: b"\x1b[8;40;120t"),
]
_ANSI = re.compile(rb"\x1b\[[0-9;?<>=!]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1bP.*?\x1b\\"
                   rb"|\x1b[()][0-9A-Za-z]|\x1b[=>78DEHMNOZc]")


class ClaudeTerminal:
    """
    A program on a pty (120x40), its output kept, its terminal queries
    answered.
    """

    def __init__(self, argv, env, cwd, log_path=None):
        import fcntl
        import struct
        import termios

        self.output = bytearray()
        self._lock = threading.Lock()
        self.log = open(log_path, "wb") if log_path else None
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.master = master
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        cwd=cwd, start_new_session=True, close_fds=True)
        os.close(slave)
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        pending = b""
        while self.running:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.2)
            except (OSError, ValueError):
                break
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                break
            if not data:
                break
            with self._lock:
                self.output += data
            if self.log:
                self.log.write(data)
                self.log.flush()
            pending = (pending + data)[-256:]
            for pattern, reply in _QUERIES:
                for match in pattern.finditer(pending):
                    self._write(reply(match))
                pending = pattern.sub(b"", pending)

    def _write(self, data):
        try:
            os.write(self.master, data)
        except OSError:
            pass

    def type(self, text, enter=True):
        """
        Type C{text} (and Enter) as a person would, a few characters at a
        time.
        """
        data = text.encode("utf-8")
        for start in range(0, len(data), 16):
            self._write(data[start:start + 16])
            time.sleep(0.02)
        if enter:
            time.sleep(0.3)
            self._write(b"\r")

    def screen_text(self):
        with self._lock:
            raw = bytes(self.output)
        return _ANSI.sub(b"", raw).decode("utf-8", "replace")

    def wait_for_text(self, text, timeout=60, since=0):
        """
        Wait until C{text} is on the screen, ignoring white space: Claude
        Code's renderer moves the cursor over blanks (CSI n C) as often as it
        writes them, and those moves are stripped with the other escapes, so
        "1 online · ✉ 0" may arrive as "1online·✉0".
        """
        wanted = "".join(text.split())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if wanted in "".join(self.screen_text()[since:].split()):
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def close(self, timeout=15):
        """
        End the program (Ctrl-C twice, then SIGTERM, then SIGKILL to its
        whole process group) and stop reading.
        """
        if self.process.poll() is None:
            for _ in range(2):
                self._write(b"\x03")
                time.sleep(0.5)
        try:
            self.process.wait(timeout / 3)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except OSError:
                pass
            try:
                self.process.wait(timeout / 3)
                break
            except subprocess.TimeoutExpired:
                continue
        self.running = False
        self.thread.join(5)
        try:
            os.close(self.master)
        except OSError:
            pass
        if self.log:
            self.log.close()
        return self.process.returncode
