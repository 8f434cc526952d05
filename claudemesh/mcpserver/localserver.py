"""
The MCP server's side of the local channel (L{claudemesh.mcpserver.local}):
a Unix socket, mode 0600 in a 0700 directory, that answers one JSON line
with one JSON line and closes.

The reactor is a parameter; nothing here imports the global one.
"""

import errno
import json
import os
import socket

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from claudemesh.mcpserver import local

IDLE_SECONDS = 2.0


class LocalRequest(LineOnlyReceiver):
    """
    One connection: one request line, one answer line.
    """

    delimiter = b"\n"
    MAX_LENGTH = local.MAX_LINE_BYTES
    _log = Logger()

    def connectionMade(self):
        self._timer = self.factory.reactor.callLater(IDLE_SECONDS, self.transport.abortConnection)
        self._answered = False

    def connectionLost(self, reason):
        if self._timer.active():
            self._timer.cancel()

    def lineReceived(self, line):
        if self._answered:
            return
        self._answered = True
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            request = None
        if not isinstance(request, dict):
            self._reply({"error": "not a JSON object"})
            return
        d = defer.maybeDeferred(self.factory.answer, request)
        d.addErrback(self._failed)
        d.addCallback(self._reply)

    def _failed(self, failure):
        self._log.failure("answering a local request failed", failure)
        return {"error": "internal error"}

    def lineLengthExceeded(self, line):
        self._answered = True
        self._reply({"error": "request too long"})

    def _reply(self, answer):
        if self.transport.connected:
            self.transport.write(json.dumps(answer, separators=(",", ":"),
                                            ensure_ascii=False).encode("utf-8") + b"\n")
            self.transport.loseConnection()


class LocalFactory(protocol.Factory):
    protocol = LocalRequest
    noisy = False

    def __init__(self, reactor, answer):
        self.reactor = reactor
        self.answer = answer


def _stale(path):
    """
    Is there a socket file at C{path} that nobody listens on?
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.2)
        probe.connect(path)
    except OSError as e:
        return e.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return False


class LocalServer:
    """
    Listen on C{path} and answer with C{answer(request)} (a dict, or a
    L{Deferred} of one).
    """

    _log = Logger()

    def __init__(self, reactor, path, answer):
        self.reactor = reactor
        self.path = path
        self.answer = answer
        self.port = None
        self._inode = None

    def start(self):
        """
        Listen. A socket left by an earlier server of the same Claude Code
        (a restart) is replaced.

        @raise local.RuntimeDirError: the directory is not private.
        @raise OSError: the socket cannot be made.
        """
        local.ensure_runtime_dir(os.path.dirname(self.path))
        if os.path.exists(self.path):
            if not _stale(self.path):
                self._log.info("replacing the live local socket {path} (the newer server "
                               "of this session answers the hooks)", path=self.path)
            os.unlink(self.path)
        # Bound here and adopted, not listenUNIX: Twisted's UNIX port
        # unlinks its path when it stops, which would remove the socket of a
        # newer server of the same session.
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                listening.bind(self.path)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            listening.listen(16)
            listening.setblocking(False)
            self._inode = os.stat(self.path).st_ino
            self.port = self.reactor.adoptStreamPort(
                listening.fileno(), socket.AF_UNIX, LocalFactory(self.reactor, self.answer))
        finally:
            # adoptStreamPort duplicated the descriptor.
            listening.close()
        return self.port

    def stop(self):
        """
        Stop listening and remove the socket file, unless a newer server
        put its own there.
        """
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        return defer.maybeDeferred(port.stopListening)
