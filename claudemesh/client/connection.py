"""
The reconnecting WebSocket client of one mesh.

L{MeshClient} says hello (signed by the member key, with a session key proof
when it has a session key), keeps requests correlated by C{_reqId} and sends
by C{id}, queues a bounded number of frames while it is disconnected,
reconnects with full-jitter backoff (caps 1, 2, 4, 8, 16, 30 s), opens and
de-duplicates pushes, C{client_ack}s each push once the application has it,
and follows the close-code table of docs/protocol.md (L{close_action}, in
L{claudemesh.client.closes}).

Frame size: the broker says in C{hello_ack} how large a frame it takes
(C{maxMessageBytes}); a bigger request fails at once with L{MessageTooLarge}
and is never written. A broker that does not say so and closes with 1009
fails the largest frame in flight the same way (it is not re-sent), and the
client remembers the bound for the frames after it.

The reactor is a parameter; nothing here imports the global one.
"""

import collections
import itertools
import json
import os
import random as _random
import urllib.parse

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.logger import Logger

from claudemesh import crypto, protocol
from claudemesh.client import keyring, meshkeys, messages
from claudemesh.client.closes import (  # noqa: F401 (the client's policy, used as connection.X)
    RECONNECT,
    STOP,
    TERMINAL,
    TERMINAL_POLICY_REASONS,
    backoff_delay,
    close_action,
    is_tls_failure,
    terminal_message,
    tls_error_text,
    tls_hint,
)
from claudemesh.client.errors import (  # noqa: F401 (the client's failures, as connection.X)
    ClientError,
    MessageTooLarge,
    QueueFull,
    RequestError,
    SessionReplaced,
    Stopped,
    TerminalClose,
    Unreachable,
    too_large,
)
from claudemesh.client.requests import Requests, encode_frame  # noqa: F401
from claudemesh.protocol import CLOSE_TOO_BIG, KICKED_MESSAGE  # noqa: F401

HELLO_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
MAX_QUEUE = 256
MAX_INBOUND_BYTES = 16 * 1024 * 1024
SEEN_LIMIT = 10_000

class _Protocol(WebSocketClientProtocol):
    lost_reason = None

    def connectionLost(self, reason):
        # Kept for the error message: Autobahn's onClose only says 1006.
        self.lost_reason = reason
        WebSocketClientProtocol.connectionLost(self, reason)

    def onOpen(self):
        self.factory.client._opened(self)

    def onMessage(self, payload, isBinary):
        if not isBinary:
            self.factory.client._received(self, payload)

    def onClose(self, wasClean, code, reason):
        self.factory.client._closed(self, wasClean, code, reason)

    def send_frame(self, frame):
        self.sendMessage(encode_frame(frame), isBinary=False)


def make_factory(url, reactor, max_bytes=MAX_INBOUND_BYTES, open_timeout=CONNECT_TIMEOUT):
    """
    The Autobahn client factory: closes seen as sent (C{failByDrop=False}),
    a payload limit, and keepalive pings.
    """
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = _Protocol
    factory.noisy = False
    factory.setProtocolOptions(
        failByDrop=False, maxMessagePayloadSize=max_bytes, maxFramePayloadSize=max_bytes,
        openHandshakeTimeout=open_timeout, closeHandshakeTimeout=2,
        autoPingInterval=30, autoPingTimeout=45)
    return factory


def default_endpoint(reactor, url, timeout):
    """
    A client endpoint for C{ws://} or C{wss://} URL C{url}.
    """
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


class MeshClient(Requests):
    """
    One session on one mesh, reconnecting until stopped or ended by the
    broker.

    @ivar hello_ack: the last C{hello_ack}.
    @ivar session_identity: the session key, or C{None}.
    """

    _log = Logger()

    def __init__(self, reactor, mesh, session_id, session_identity=None, receive=True,
                 display_name=None, pid=None, cwd=None, hello_extra=None,
                 on_message=None, on_event=None, on_terminal_close=None, on_connect=None,
                 on_disconnect=None, presence=True,
                 max_queue=MAX_QUEUE, hello_timeout=HELLO_TIMEOUT,
                 connect_timeout=CONNECT_TIMEOUT, max_attempts=None,
                 random=_random.random, endpoint_factory=default_endpoint, history=None):
        """
        @param mesh: the L{claudemesh.client.config.MeshEntry}.
        @param on_message: called with each new L{messages.Inbound}; the push
            is acknowledged once it returns (or its L{Deferred} fires).
        @param on_event: called with each system push (C{peer_joined}, ...).
        @param on_terminal_close: called with C{(code, reason, message)}
            when the broker ends the session for good.
        @param on_connect: called with each C{hello_ack} (first connection
            and every reconnection).
        @param on_disconnect: called with C{(code, reason)} when a working
            connection is lost and the client is about to reconnect.
        @param presence: C{False} for a receiving session that must not be
            announced (a one-shot C{inbox}): no presence events, not listed.
        @param max_attempts: give up (L{Unreachable}) after this many
            consecutive failed connection attempts; C{None} retries forever.
        @param history: a L{claudemesh.client.history.History} that records
            what L{send_text} sent and what was handed to C{on_message}.
        """
        self._reactor = reactor
        self.mesh = mesh
        self.identity = mesh.identity
        self.session_id = session_id
        self.session_identity = session_identity
        self.receive = receive
        self.display_name = display_name
        self.pid = os.getpid() if pid is None else pid
        self.cwd = os.getcwd() if cwd is None else cwd
        self.hello_extra = dict(hello_extra or {})
        self.on_message = on_message
        self.on_event = on_event
        self.on_terminal_close = on_terminal_close
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.presence = presence
        self.max_queue = max_queue
        self.hello_timeout = hello_timeout
        self.connect_timeout = connect_timeout
        self.max_attempts = max_attempts
        self._random = random
        self._endpoint_factory = endpoint_factory
        # Issue 17: the mesh's keys by epoch (claudemesh.client.meshkeys).
        self.mesh_keys = meshkeys.EpochKeys(self, keyring.KeyRing.of_entry(mesh))
        self.history = history

        self.hello_ack = None
        # The largest frame a 1009 close taught us, for brokers that do not
        # announce maxMessageBytes.
        self._learned_limit = None
        self.connected = False
        self.revoked = None
        self.outcome = None
        self._proto = None  # the connection that finished its hello
        self._candidate = None  # a connection saying hello
        self._connecting = None  # the endpoint's connect Deferred
        self._connect_call = None
        self._hello_timer = None
        self._hello_error = None
        self._last_failure = None
        self._attempt = 0
        self._started = False
        self._stopping = False
        self._finished = False
        self._req_ids = itertools.count(1)
        # _reqId or send id -> [frame, Deferred, timeout call, bytes written or False]
        self._pending = collections.OrderedDict()
        self._queue = collections.deque()  # fire-and-forget frames
        self._seen = collections.OrderedDict()
        self._ready_waiters = []
        self._done_waiters = []

    # -- lifecycle ------------------------------------------------------------------

    @property
    def sender_identity(self):
        """
        The key this client encrypts with and others reply to.
        """
        return self.session_identity or self.identity

    @property
    def pubkey(self):
        return self.sender_identity.pubkey

    @property
    def max_frame_bytes(self):
        """
        The largest frame the broker takes (its C{maxMessageBytes}, or what
        a 1009 close taught), or C{None} when unknown.
        """
        announced = (self.hello_ack or {}).get("maxMessageBytes")
        if isinstance(announced, bool) or not isinstance(announced, int) or announced <= 0:
            announced = None
        known = [v for v in (announced, self._learned_limit) if v is not None]
        return min(known) if known else None

    def start(self):
        """
        Connect. Returns L{when_ready}.
        """
        if not self._started:
            self._started = True
            self._connect()
        return self.when_ready()

    def when_ready(self):
        """
        A L{Deferred} firing with the C{hello_ack} once connected, or failing
        with the outcome if the client stops first.
        """
        if self.connected:
            return defer.succeed(self.hello_ack)
        if self._finished:
            return self._outcome_result()
        d = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def when_done(self):
        """
        A L{Deferred} firing with C{None} after L{stop}, or failing with
        L{TerminalClose}, L{SessionReplaced} or L{Unreachable}.
        """
        if self._finished:
            return self._outcome_result()
        d = defer.Deferred()
        self._done_waiters.append(d)
        return d

    def _outcome_result(self):
        if self.outcome is None:
            return defer.succeed(None)
        return defer.fail(self.outcome)

    def stop(self):
        """
        Close the connection cleanly and stop reconnecting.
        """
        if self._finished:
            return self._outcome_result()
        done = self.when_done()
        self._stopping = True
        if self._connect_call is not None and self._connect_call.active():
            self._connect_call.cancel()
        self._connect_call = None
        proto = self._proto or self._candidate
        if proto is not None:
            proto.sendClose(1000)
        elif self._connecting is not None:
            self._connecting.cancel()
        else:
            self._finish(None)
        return done

    # -- connection ------------------------------------------------------------------------

    def _connect(self):
        self._connect_call = None
        self._hello_error = None
        factory = make_factory(self.mesh.brokerUrl, self._reactor,
                               open_timeout=self.connect_timeout)
        factory.client = self
        try:
            endpoint = self._endpoint_factory(self._reactor, self.mesh.brokerUrl,
                                              self.connect_timeout)
            d = endpoint.connect(factory)
        except Exception as e:
            d = defer.fail(e)
        self._connecting = d
        d.addCallbacks(self._tcp_connected, self._connect_failed)

    def _tcp_connected(self, proto):
        self._connecting = None
        self._candidate = proto

    def _connect_failed(self, failure):
        self._connecting = None
        if self._stopping:
            self._finish(None)
            return
        self._last_failure = failure.getErrorMessage() or failure.type.__name__
        self._retry()

    def _opened(self, proto):
        if self._stopping:
            proto.sendClose(1000)
            return
        self._candidate = proto
        now = int(self._reactor.seconds() * 1000)
        mesh = self.mesh
        hello = {
            "type": "hello",
            "meshId": mesh.meshId,
            "memberId": mesh.memberId,
            "pubkey": self.identity.pubkey,
            "timestamp": now,
            # The tagged form binds the session id: two sessions of one
            # member that say hello in the same millisecond sign different
            # strings, so the broker's replay memory tells them apart.
            "signature": self.identity.sign(crypto.hello_string(
                mesh.meshId, mesh.memberId, self.identity.pubkey, now, self.session_id)),
            "sessionId": self.session_id,
            "pid": self.pid,
            "cwd": self.cwd[:4096],
            "receive": self.receive,
            "_reqId": "hello",
        }
        if not self.presence:
            hello["presence"] = False
        if mesh.groups:
            hello["groups"] = [dict(g) for g in mesh.groups]
        if self.display_name:
            hello["displayName"] = self.display_name
        if self.session_identity is not None:
            key = self.session_identity.pubkey
            hello["sessionPubkey"] = key
            hello["sessionSignature"] = self.identity.sign(
                crypto.session_proof_string(mesh.meshId, self.identity.pubkey, key))
        hello.update(self.hello_extra)
        proto.send_frame(hello)
        self._hello_timer = self._reactor.callLater(
            self.hello_timeout, self._hello_timed_out, proto)

    def _hello_timed_out(self, proto):
        self._hello_timer = None
        self._last_failure = "no hello_ack within %g s" % (self.hello_timeout,)
        proto.dropConnection(abort=True)

    def _hello_done(self, proto, ack):
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None
        self._proto, self._candidate = proto, None
        self.hello_ack = ack
        self.connected = True
        self._attempt = 0
        self._last_failure = None
        # Issue 17: the mesh's current key epoch, its key fetched if need be.
        self.mesh_keys.hello(ack)
        # Requests written on a connection that dropped: a send is retried
        # with its id (stored once); anything else already failed.
        for key, entry in list(self._pending.items()):
            if self._proto is not proto:
                return
            if key in self._pending:
                self._write(key, entry)
        while self._queue and self._proto is proto:
            proto.send_frame(self._queue.popleft())
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(ack)
        if self.on_connect is not None:
            try:
                self.on_connect(ack)
            except Exception:
                self._log.failure("on_connect failed")

    def _closed(self, proto, was_clean, code, reason):
        if proto is not self._proto and proto is not self._candidate:
            return
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None
        was_working = proto is self._proto
        self._proto = self._candidate = None
        self.connected = False
        code = 1006 if code is None else code
        if code == CLOSE_TOO_BIG:
            self._refuse_largest_written()
        for key, entry in list(self._pending.items()):
            if entry[3] and entry[0].get("type") != "send":
                self._resolve(key, failure=RequestError(
                    "connection_lost", "the connection to the broker was lost", entry[0]))
            else:
                entry[3] = False
        if self._stopping:
            self._finish(None)
            return
        action = close_action(code, reason)
        if action == STOP:
            self._finish(SessionReplaced())
        elif action == TERMINAL:
            error = self._hello_error.get("message") if self._hello_error else None
            message = terminal_message(code, reason, self.mesh.name, self.revoked, error)
            if self.on_terminal_close is not None:
                try:
                    self.on_terminal_close(code, reason, message)
                except Exception:
                    self._log.failure("on_terminal_close failed")
            self._finish(TerminalClose(code, reason, message))
        else:
            self._last_failure = "closed %s%s" % (code, " " + reason if reason else "")
            hint = self._tls_hint(proto)
            if hint:
                self._last_failure = hint
            if was_working and self.on_disconnect is not None:
                try:
                    self.on_disconnect(code, reason)
                except Exception:
                    self._log.failure("on_disconnect failed")
            self._retry()

    def _refuse_largest_written(self):
        """
        The broker closed 1009: a frame was too big. Fail the largest one
        written on that connection (it is not re-sent: it would be refused
        again) and remember its size as too big.
        """
        written = [(entry[3], key) for key, entry in self._pending.items() if entry[3]]
        if not written:
            return
        size, key = max(written)
        self._learned_limit = min(size - 1, self._learned_limit or size)
        self._resolve(key, failure=too_large(self._pending[key][0], size, None))

    def _tls_hint(self, proto):
        """
        For a C{wss://} URL whose TLS handshake failed, a message that says
        what probably went wrong.
        """
        if not self.mesh.brokerUrl.startswith("wss:"):
            return None
        reason = getattr(proto, "lost_reason", None)
        if reason is None or not is_tls_failure(reason):
            return None
        return tls_hint(self.mesh.brokerUrl, tls_error_text(reason))

    def _retry(self):
        self._attempt += 1
        if self.max_attempts is not None and self._attempt >= self.max_attempts:
            self._finish(Unreachable(
                "Cannot reach the broker at %s (%s)."
                % (self.mesh.brokerUrl, self._last_failure or "no answer")))
            return
        delay = backoff_delay(self._attempt - 1, self._random)
        self._connect_call = self._reactor.callLater(delay, self._connect)

    def _finish(self, outcome):
        if self._finished:
            return
        self._finished = True
        self.outcome = outcome
        self.connected = False
        if self._connect_call is not None and self._connect_call.active():
            self._connect_call.cancel()
        self._connect_call = None
        failure = outcome or Stopped("the client is stopped")
        for key in list(self._pending):
            self._resolve(key, failure=failure)
        self._queue.clear()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(failure)
        waiters, self._done_waiters = self._done_waiters, []
        for d in waiters:
            if outcome is None:
                d.callback(None)
            else:
                d.errback(outcome)

    # -- inbound -----------------------------------------------------------------------------

    def _received(self, proto, payload):
        try:
            frame = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            # RecursionError: nested deeper than the parser recurses.
            self._log.warn("the broker sent a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if proto is not self._proto:
            # Saying hello: only hello_ack and error matter.
            if kind == "hello_ack" and proto is self._candidate:
                self._hello_done(proto, frame)
            elif kind == "error":
                self._hello_error = frame
                if frame.get("code") == "revoked":
                    self.revoked = frame.get("message") or protocol.revoked_message(self.mesh.name)
            return
        if kind == "push":
            self._push(frame)
        elif kind == "ack":
            self._resolve("send:%s" % (frame.get("id"),), frame)
        elif kind == "error":
            self._error(frame)
        else:
            req_id = frame.get("_reqId")
            if not (isinstance(req_id, str) and self._resolve(req_id, frame)):
                self._log.debug("unexpected {type} frame", type=kind)

    def _error(self, frame):
        code = frame.get("code") or "error"
        message = frame.get("message") or code
        if code == "revoked":
            # Kept: the close that follows (4002 banned) must not replace it.
            if self.revoked is None:
                self.revoked = message
        failure = RequestError(code, message, frame)
        req_id = frame.get("_reqId")
        if isinstance(req_id, str) and self._resolve(req_id, failure=failure):
            return
        send_id = frame.get("id")
        if isinstance(send_id, str) and self._resolve("send:" + send_id, failure=failure):
            return
        if code != "revoked":
            self._log.warn("the broker reported {code}: {message}", code=code,
                           message=message)

    def _push(self, frame):
        if frame.get("subtype") == "system":
            # Issue 17: key epoch events (a rotation, a copy to fetch).
            self.mesh_keys.event(frame)
            if self.on_event is not None:
                try:
                    self.on_event(frame)
                except Exception:
                    self._log.failure("on_event failed")
            return
        message_id = frame.get("messageId")
        if not isinstance(message_id, str) or not message_id:
            return
        if message_id in self._seen:
            # A redelivery of something the application already has.
            self._ack(message_id)
            return
        # Issue 17: held, in order, while the key of its epoch is fetched.
        self.mesh_keys.admit(frame, self._open_push)

    def _open_push(self, frame):
        message_id = frame["messageId"]
        if message_id in self._seen:
            self._ack(message_id)
            return
        inbound = messages.open_push(frame, self.identity, self.session_identity,
                                     key_of_epoch=self.mesh_keys.key_of)
        if self.on_message is None:
            return
        self._seen[message_id] = True
        while len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)
        if self.history is not None:
            self.history.note_received(self, inbound)
        d = defer.maybeDeferred(self.on_message, inbound)

        def handed(_):
            self._ack(message_id)

        def failed(f):
            # Not acknowledged: the broker pushes it again after the lease.
            self._seen.pop(message_id, None)
            self._log.failure("on_message failed", f)

        d.addCallbacks(handed, failed)

    def _ack(self, message_id):
        if self.connected:
            self._proto.send_frame({"type": "client_ack", "messageId": message_id})
