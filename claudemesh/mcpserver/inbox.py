"""
Delivery into Claude Code's cross-session inbox socket.

Claude Code (2.1.224 and later, first-party API, macOS / Linux / WSL 2)
binds a Unix socket for each interactive session and puts its path and an
auth token in the environment of its hooks and MCP server children:
C{CLAUDE_CODE_MESSAGING_SOCKET} and C{CLAUDE_CODE_MESSAGING_TOKEN}. A client
connects, sends C{{"type":"auth","token":…}} as a first line (optional on
some set-ups, so we send it whenever we have a token), then one
newline-terminated JSON object::

    {"type": "user", "message": {"role": "user", "content": "<text>"},
     "priority": "now" | "next" | "later"}

and closes. An idle session starts a turn with the text; during a turn
C{next} runs as the next turn and C{now} interrupts the request in flight.
The line is capped at 1,048,576 characters; a connection that sends nothing
for 30 s is closed.

This is not a documented wire format (Anthropic documents the two
variables and the auth line), so the MCP server treats every failure as
"use the next path" (docs/claude-code.md). L{InboxSocket.deliver} fires
only once the whole line was written and the connection closed cleanly,
which is when the MCP server acknowledges the message to the broker.

The reactor is a parameter; nothing here imports the global one.
"""

import json
import os

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.python.failure import Failure

SOCKET_VARIABLE = "CLAUDE_CODE_MESSAGING_SOCKET"
MANAGED_SETTINGS = "/etc/claude-code/managed-settings.json"
TOKEN_VARIABLE = "CLAUDE_CODE_MESSAGING_TOKEN"

# The whole JSON line Claude Code accepts, in characters.
MAX_LINE_CHARS = 1_048_576
# Connect and write; Claude Code reads a local socket in milliseconds, so
# anything slower is a session that is stuck or gone.
TIMEOUT_SECONDS = 5.0

# Mesh priority -> the socket's. Claude Code's queue knows now / next /
# later; "low" would be read as "next", so it is spelled "later".
PRIORITIES = {"now": "now", "next": "next", "low": "later"}

CUT_NOTE = ("\n\n[claudemesh: this message was cut to fit Claude Code's inbox: %d of %d "
            "characters shown. check_messages returns it whole.]")


class InboxRefused(Exception):
    """
    The socket did not take the message; C{str()} says why (for the log).
    """


def cross_session_inbound(environ, cwd):
    """
    Claude Code's C{crossSessionInbound} setting (C{accept}, C{hold},
    C{refuse}) as the session will read it, or C{None} when unset: managed
    settings first, then the project's local and shared settings, then the
    user's. A file that cannot be read counts as not saying.
    """
    home = environ.get("HOME") or os.path.expanduser("~")
    for path in (MANAGED_SETTINGS,
                 os.path.join(cwd, ".claude", "settings.local.json"),
                 os.path.join(cwd, ".claude", "settings.json"),
                 os.path.join(home, ".claude", "settings.json")):
        try:
            with open(path, "rb") as f:
                document = json.loads(f.read(1024 * 1024).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        value = document.get("crossSessionInbound") if isinstance(document, dict) else None
        if value in ("accept", "hold", "refuse"):
            return value
    return None


def socket_from(environ):
    """
    C{(path, token)} from Claude Code's environment; C{(None, None)} when
    this session has no inbox socket.
    """
    path = environ.get(SOCKET_VARIABLE) or None
    token = environ.get(TOKEN_VARIABLE) or None
    return path, (token if path else None)


def message_line(text, priority="next"):
    """
    The message object as one JSON line (C{str}, newline included), and
    whether C{text} had to be cut to stay under L{MAX_LINE_CHARS}.

    @raise ValueError: C{text} is empty (Claude Code ignores such a line).
    """
    if not isinstance(text, str) or not text:
        raise ValueError("the inbox takes non-empty text only")

    def line(content):
        return json.dumps({"type": "user", "message": {"role": "user", "content": content},
                           "priority": PRIORITIES.get(priority, "next")},
                          ensure_ascii=False, separators=(",", ":")) + "\n"

    whole = line(text)
    if len(whole) <= MAX_LINE_CHARS:
        return whole, False
    # JSON escaping makes some characters longer (a newline is two), so cut,
    # measure, and cut again by what is still over.
    keep = MAX_LINE_CHARS - (len(whole) - len(text)) - len(CUT_NOTE % (len(text), len(text)))
    while keep > 0:
        candidate = line(text[:keep] + CUT_NOTE % (keep, len(text)))
        over = len(candidate) - MAX_LINE_CHARS
        if over <= 0:
            return candidate, True
        keep -= over
    raise ValueError("no room for the text in an inbox line")


def auth_line(token):
    return json.dumps({"type": "auth", "token": token}, separators=(",", ":")) + "\n"


class _LineWriter(protocol.Protocol):
    """
    Write the lines, close, and report how the connection ended.
    """

    def __init__(self, data, finished):
        self.data = data
        self.finished = finished
        self.closing = False

    def connectionMade(self):
        self.transport.write(self.data)
        # loseConnection stops reading and flushes what is buffered: a
        # clean close after it means every byte was written.
        self.closing = True
        self.transport.loseConnection()

    def dataReceived(self, data):
        # Claude Code does not answer; anything it might say is ignored.
        pass

    def connectionLost(self, reason):
        if self.finished.called:
            return
        if self.closing and reason.check(error.ConnectionDone):
            self.finished.callback(None)
        else:
            self.finished.errback(InboxRefused("connection lost before the message was "
                                               "written: %s" % (reason.getErrorMessage(),)))


class _WriterFactory(protocol.Factory):
    def __init__(self, data, finished):
        self.data = data
        self.finished = finished

    def buildProtocol(self, addr):
        return _LineWriter(self.data, self.finished)


class InboxSocket:
    """
    One Claude Code session's inbox socket.

    @ivar delivered: how many messages the socket took.
    @ivar failed: how many it did not; C{last_failure} says why the last did not.
    """

    def __init__(self, reactor, path, token=None, timeout=TIMEOUT_SECONDS,
                 endpoint_factory=None):
        self._reactor = reactor
        self.path = path
        self.token = token
        self.timeout = timeout
        self._endpoint_factory = endpoint_factory or (
            lambda r, p, t: UNIXClientEndpoint(r, p, timeout=t))
        self.delivered = 0
        self.failed = 0
        self.last_failure = None

    def deliver(self, text, priority="next"):
        """
        Hand C{text} to the session. Fires with C{True} when the text was cut
        to fit, C{False} when it went whole, once the socket took it; fails
        with L{InboxRefused} when the socket is gone, refuses, closes early
        or times out.
        """
        try:
            line, cut = message_line(text, priority)
        except ValueError as e:
            return defer.fail(InboxRefused(str(e)))
        data = ((auth_line(self.token) if self.token else "") + line).encode("utf-8")
        finished = defer.Deferred()
        endpoint = self._endpoint_factory(self._reactor, self.path, self.timeout)
        connecting = endpoint.connect(_WriterFactory(data, finished))
        state = {"proto": None}

        def connected(proto):
            state["proto"] = proto

        def not_connected(failure):
            if not finished.called:
                finished.errback(InboxRefused("cannot connect to %s: %s" % (
                    self.path, failure.getErrorMessage())))

        connecting.addCallbacks(connected, not_connected)

        def too_slow():
            if finished.called:
                return
            proto = state["proto"]
            if proto is None:
                connecting.cancel()
            else:
                proto.transport.abortConnection()
            if not finished.called:
                finished.errback(InboxRefused("timed out after %g s" % (self.timeout,)))

        timer = self._reactor.callLater(self.timeout, too_slow)

        def done(result):
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                self.failed += 1
                self.last_failure = result.getErrorMessage()
                return result
            self.delivered += 1
            return cut

        return finished.addBoth(done)
