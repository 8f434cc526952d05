"""
The pieces the fault and flood runs are made of: a broker subprocess
(C{twistd -n claudemesh-broker}), a throwaway Postgres cluster, real
WebSocket clients, raw HTTP upgrades, and the mesh set-up through the
broker's own routes (C{POST /meshes}, C{create_invite}, C{POST /join}).

Everything here runs on the reactor it is given and cleans up after itself:
every client is closed, every process reaped, every temporary cluster
stopped. Only the soak runs and integration tests use it.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, task
from twisted.internet import protocol as tprotocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from claudemesh import crypto
from claudemesh.client import messages
from claudemesh.invite import encode_token, sign_invite


class HarnessError(Exception):
    """
    The run could not be set up (a process did not start, a route refused).
    """


def free_port():
    """
    A TCP port of 127.0.0.1 that nothing listened on a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_ms(reactor):
    return int(reactor.seconds() * 1000)


def sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def percentile(values, p):
    """
    The C{p}-th percentile (nearest rank) of C{values}, or C{None}.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(round(p / 100.0 * len(ordered) + 0.5)))
    return ordered[min(rank, len(ordered)) - 1]


def twistd_command():
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# Environment variables the broker reads: a run sets what it means to and
# inherits none of them from the shell.
_BROKER_VARIABLES = ("BROKER_PORT", "DATABASE_URL", "STATUS_TTL_SECONDS",
                     "HOOK_FRESH_WINDOW_SECONDS", "MAX_CONNECTIONS_PER_MESH",
                     "MAX_MESSAGE_BYTES", "HOOK_RATE_LIMIT_PER_MIN", "SEND_RATE_LIMIT_PER_MIN",
                     "SEND_RATE_LIMIT_BURST")


def broker_environment(extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in _BROKER_VARIABLES and not k.startswith("CLAUDEMESH_")}
    env.update(extra or {})
    return env


def read_proc_kb(pid, field):
    """
    A C{kB} field of C{/proc/<pid>/status} (C{VmRSS}, C{VmHWM}), or C{None}.
    """
    try:
        with open("/proc/%d/status" % (pid,)) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# -- HTTP ------------------------------------------------------------------------


@defer.inlineCallbacks
def http(reactor, method, url, body=None, headers=None, timeout=5.0):
    """
    One HTTP request; fires with C{(status, decoded JSON or None)}, or
    C{(None, None)} when nothing answered.
    """
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=timeout))
    request_headers = {b"Content-Type": [b"application/json"]}
    for name, value in (headers or {}).items():
        request_headers[name.encode("ascii")] = [value.encode("utf-8")]
    data = None if body is None else json.dumps(body).encode("utf-8")
    try:
        response = yield client.request(method, url, data=data, headers=request_headers,
                                        timeout=timeout)
        raw = yield response.content()
    except Exception:
        return None, None
    finally:
        yield pool.closeCachedConnections()
    try:
        document = json.loads(raw.decode("utf-8"))
    except ValueError:
        document = None
    return response.code, document


@defer.inlineCallbacks
def wait_for_status(reactor, url, wanted, timeout, interval=0.1):
    """
    Poll C{url} until it answers C{wanted}; fires with the seconds it took.

    @raise HarnessError: after C{timeout} seconds.
    """
    started = reactor.seconds()
    while True:
        code, _ = yield http(reactor, "GET", url, timeout=2.0)
        if code == wanted:
            return reactor.seconds() - started
        if reactor.seconds() - started > timeout:
            raise HarnessError("%s did not answer %s within %s s (last: %s)"
                               % (url, wanted, timeout, code))
        yield sleep(reactor, interval)


# -- processes ---------------------------------------------------------------------


class _Watcher(tprotocol.ProcessProtocol):
    def __init__(self, log):
        self.log = log
        self.ended = defer.Deferred()
        self.status = None

    def outReceived(self, data):
        self.log.write(data)
        # Readable while the broker runs (log_text).
        self.log.flush()

    errReceived = outReceived

    def processEnded(self, reason):
        self.status = (reason.value.exitCode, reason.value.signal)
        self.log.close()
        self.ended.callback(self.status)


class BrokerProcess:
    """
    A C{twistd -n --pidfile= claudemesh-broker} subprocess on a port of
    127.0.0.1, with its data directory and log in C{workdir}. It can be
    started again on the same data directory and port after it ended.
    """

    def __init__(self, reactor, workdir, args=(), env=None, port=None, cpus=None):
        self.reactor = reactor
        # Pin the broker to these CPUs (taskset), e.g. to keep load
        # generators off its core while latency is measured.
        self.cpus = cpus
        self.workdir = workdir
        self.args = list(args)
        self.env = env or {}
        self.port = port or free_port()
        self.http = "http://127.0.0.1:%d" % (self.port,)
        self.url = "ws://127.0.0.1:%d/ws" % (self.port,)
        self.data_dir = os.path.join(workdir, "data")
        self.log_path = os.path.join(workdir, "broker.log")
        self._transport = None
        self._watcher = None

    @property
    def running(self):
        return self._watcher is not None and not self._watcher.ended.called

    @property
    def pid(self):
        return self._transport.pid if self.running else None

    @defer.inlineCallbacks
    def start(self, wait_path="/health/ready", timeout=30.0):
        """
        Start the broker; fires once C{wait_path} answers 200.
        """
        if self.running:
            raise HarnessError("the broker runs already")
        argv = twistd_command() + [
            "-n", "--pidfile=", "claudemesh-broker",
            "--port", "tcp:%d:interface=127.0.0.1" % (self.port,),
            "--data-dir", self.data_dir] + self.args
        if self.cpus and shutil.which("taskset"):
            argv = [shutil.which("taskset"), "-c", self.cpus] + argv
        self._watcher = _Watcher(open(self.log_path, "ab"))
        self._transport = self.reactor.spawnProcess(
            self._watcher, argv[0], argv, env=broker_environment(self.env), path=self.workdir)
        started = self.reactor.seconds()
        while True:
            if not self.running:
                raise HarnessError("the broker exited at start-up %r; see %s"
                                   % (self._watcher.status, self.log_path))
            code, _ = yield http(self.reactor, "GET", self.http + wait_path, timeout=2.0)
            if code == 200:
                return self.reactor.seconds() - started
            if self.reactor.seconds() - started > timeout:
                yield self.kill()
                raise HarnessError("the broker did not answer %s within %s s; see %s"
                                   % (wait_path, timeout, self.log_path))
            yield sleep(self.reactor, 0.1)

    def kill(self):
        """
        C{kill -9}; fires with the exit status once the process is reaped.
        """
        if not self.running:
            return defer.succeed(self._watcher.status if self._watcher else None)
        self._transport.signalProcess("KILL")
        return self._watcher.ended

    @defer.inlineCallbacks
    def terminate(self, timeout=10.0):
        """
        SIGTERM; fires with C{(exit code, signal, seconds)}. Kills it after
        C{timeout} (the result then says signal 9).
        """
        if not self.running:
            return self._watcher.status + (0.0,) if self._watcher else None
        started = self.reactor.seconds()
        self._transport.signalProcess("TERM")
        ended = self._watcher.ended
        timer = self.reactor.callLater(timeout, self._kill_if_running)
        status = yield ended
        if timer.active():
            timer.cancel()
        return status + (self.reactor.seconds() - started,)

    def _kill_if_running(self):
        if self.running:
            self._transport.signalProcess("KILL")

    @defer.inlineCallbacks
    def cleanup(self):
        """
        Make sure it is gone (for test clean-ups).
        """
        if self.running:
            yield self.kill()

    def rss_kb(self):
        return read_proc_kb(self.pid, "VmRSS") if self.running else None

    def peak_rss_kb(self):
        return read_proc_kb(self.pid, "VmHWM") if self.running else None

    def log_text(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def find_initdb():
    """
    The C{initdb} of the newest PostgreSQL installed, or C{None}.
    """
    found = shutil.which("initdb")
    if found:
        return found
    base = "/usr/lib/postgresql"
    try:
        versions = sorted(os.listdir(base), key=lambda v: [int(p) for p in v.split(".")
                                                           if p.isdigit()])
    except OSError:
        return None
    for version in reversed(versions):
        candidate = os.path.join(base, version, "bin", "initdb")
        if os.path.exists(candidate):
            return candidate
    return None


class TemporaryPostgres:
    """
    A throwaway PostgreSQL cluster in a temporary directory on a free port of
    127.0.0.1, run as the C{postgres} OS user when we are root. Stopping it
    disturbs no other server.
    """

    def __init__(self, reactor, initdb=None):
        self.reactor = reactor
        self.initdb = initdb or find_initdb()
        if self.initdb is None:
            raise HarnessError("initdb not found (install PostgreSQL server binaries)")
        self.bindir = os.path.dirname(self.initdb)
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="claudemesh-pg-")
        self.datadir = os.path.join(self.root, "data")
        self.logfile = os.path.join(self.root, "postgres.log")
        self.url = "postgresql://postgres@127.0.0.1:%d/postgres" % (self.port,)
        self._as_user = []
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.running = False

    def _run(self, *argv):
        from twisted.internet import threads

        command = self._as_user + list(argv)

        def run():
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    timeout=60, cwd=self.root)
            if result.returncode != 0:
                raise HarnessError("%s failed (%d): %s" % (
                    os.path.basename(argv[0]), result.returncode,
                    result.stdout.decode("utf-8", "replace")[-2000:]))
            return result.stdout

        return threads.deferToThread(run)

    def _pg_ctl(self, *args):
        return self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, *args)

    @defer.inlineCallbacks
    def create(self):
        yield self._run(self.initdb, "-D", self.datadir, "-U", "postgres", "-A", "trust",
                        "--no-sync", "-E", "UTF8")
        yield self.start()

    @defer.inlineCallbacks
    def start(self):
        options = ("-p %d -c listen_addresses=127.0.0.1 -k %s -c fsync=off"
                   % (self.port, self.root))
        yield self._pg_ctl("-w", "-t", "30", "-l", self.logfile, "-o", options, "start")
        self.running = True

    @defer.inlineCallbacks
    def stop(self):
        self.running = False
        yield self._pg_ctl("-w", "-t", "30", "-m", "fast", "stop")

    @defer.inlineCallbacks
    def destroy(self):
        if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            try:
                yield self._pg_ctl("-w", "-t", "30", "-m", "immediate", "stop")
            except HarnessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


# -- WebSocket clients -------------------------------------------------------------


class ClientProtocol(WebSocketClientProtocol):
    """
    The WebSocket test client of the soak runs and of the test suite: it
    records every frame it receives (decoded) in C{frames} and a
    L{defer.DeferredQueue} (C{queue}), hands each to C{on_frame} when set,
    and remembers how the connection closed.

    @ivar opened: fires with the protocol when the WebSocket is open (with
        C{None} when it closed before).
    @ivar closed: fires with C{(wasClean, code, reason)} when it closed.
    """

    def __init__(self):
        WebSocketClientProtocol.__init__(self)
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self.close_info = None
        self.on_frame = None
        self.frames = []
        self.queue = defer.DeferredQueue()

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        frame = json.loads(payload.decode("utf-8"))
        self.frames.append(frame)
        self.queue.put(frame)
        if self.on_frame is not None:
            self.on_frame(frame)

    def of_type(self, type_name):
        return [f for f in self.frames if f["type"] == type_name]

    def onClose(self, wasClean, code, reason):
        self.close_info = (wasClean, code, reason)
        if not self.opened.called:
            self.opened.callback(None)
        self.closed.callback(self.close_info)

    def send_frame(self, frame):
        self.sendMessage(json.dumps(frame).encode("utf-8"), isBinary=False)


class Member:
    """
    A member identity of a mesh, as its client holds it.
    """

    def __init__(self, name, identity, mesh_id, member_id):
        self.name = name
        self.identity = identity
        self.mesh_id = mesh_id
        self.member_id = member_id

    @property
    def pubkey(self):
        return self.identity.pubkey

    def hello(self, timestamp, session_id, **extra):
        frame = {
            "type": "hello", "meshId": self.mesh_id, "memberId": self.member_id,
            "pubkey": self.pubkey, "sessionId": session_id, "pid": os.getpid(),
            "cwd": "/soak/" + self.name, "timestamp": timestamp,
            "signature": self.identity.sign(crypto.hello_string(
                self.mesh_id, self.member_id, self.pubkey, timestamp)),
        }
        frame.update(extra)
        return frame


class Peer:
    """
    One connected client of a member: sends DMs, records acks, and opens,
    records and C{client_ack}s the pushes it receives.

    @ivar acks: client id -> the C{ack} frame.
    @ivar received: plaintext -> reactor time of its first push.
    @ivar pushes: how many message pushes arrived (duplicates included).
    """

    def __init__(self, reactor, member, url, headers=None):
        self.reactor = reactor
        self.member = member
        self.url = url
        self.headers = headers
        self.client = None
        self.acks = {}
        self.received = {}
        self.pushes = 0
        self.errors = []
        self.events = []
        self.sent_at = {}
        self.auto_ack = True
        self.listeners = []
        self._replies = {}
        self._watchers = []
        self._req = 0

    @defer.inlineCallbacks
    def connect(self, session_id="main", receive=True, **extra):
        """
        Open a connection and say hello; fires with the C{hello_ack}.
        """
        host, port = self.url.split("//", 1)[1].split("/", 1)[0].split(":")
        factory = WebSocketClientFactory(self.url, reactor=self.reactor, headers=self.headers)
        factory.protocol = ClientProtocol
        factory.noisy = False
        factory.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=0,
                                   maxFramePayloadSize=0, closeHandshakeTimeout=2,
                                   openHandshakeTimeout=10)
        endpoint = TCP4ClientEndpoint(self.reactor, host, int(port), timeout=5)
        client = yield endpoint.connect(factory)
        self.client = client
        client.on_frame = self._frame
        opened = yield client.opened
        if opened is None:
            raise HarnessError("upgrade refused: %r" % (client.close_info,))
        reply = yield self.request(self.member.hello(
            now_ms(self.reactor), session_id, receive=receive, **extra), timeout=10)
        if reply.get("type") != "hello_ack":
            raise HarnessError("hello refused: %r" % (reply,))
        return reply

    @property
    def open(self):
        return (self.client is not None and self.client.close_info is None
                and self.client.state == self.client.STATE_OPEN)

    def _frame(self, frame):
        for listener in self.listeners:
            listener(frame)
        kind = frame.get("type")
        if kind == "push" and frame.get("subtype") == "system":
            self.events.append(frame)
        elif kind == "push":
            self.pushes += 1
            try:
                text = crypto.decrypt_direct(self.member.identity, frame["senderPubkey"],
                                             frame["nonce"], frame["ciphertext"])
                text = text.rstrip(b"\0").decode()
            except Exception:
                text = "undecryptable:" + frame.get("messageId", "")
            self.received.setdefault(text, self.reactor.seconds())
            if self.auto_ack and self.client.state == self.client.STATE_OPEN:
                self.client.send_frame({"type": "client_ack", "messageId": frame["messageId"]})
        elif kind == "ack":
            self.acks[frame.get("id")] = frame
        elif kind == "error":
            self.errors.append(frame)
        req_id = frame.get("_reqId")
        if req_id is not None and req_id in self._replies:
            self._replies.pop(req_id).callback(frame)
        for watcher in list(self._watchers):
            predicate, d = watcher
            if predicate(frame):
                self._watchers.remove(watcher)
                d.callback(frame)

    def request(self, frame, timeout=10.0):
        """
        Send a request frame; fires with the reply carrying its C{_reqId}.
        """
        self._req += 1
        req_id = "r%d" % (self._req,)
        frame = dict(frame, _reqId=req_id)
        d = defer.Deferred()
        self._replies[req_id] = d
        self.client.send_frame(frame)
        return d.addTimeout(timeout, self.reactor)

    def wait_for(self, predicate, timeout=10.0):
        d = defer.Deferred()
        self._watchers.append((predicate, d))
        return d.addTimeout(timeout, self.reactor)

    def send_dm(self, recipient, text, client_id, priority="next", padding=0):
        """
        Send a DM whose plaintext is C{text} (plus C{padding} bytes).
        """
        plaintext = text.encode("utf-8") + (b"\0" * padding if padding else b"")
        nonce, ciphertext = crypto.encrypt_direct(self.member.identity, recipient.pubkey,
                                                  plaintext)
        self.sent_at[client_id] = self.reactor.seconds()
        self.client.send_frame({"type": "send", "id": client_id, "targetSpec": recipient.pubkey,
                                "priority": priority, "nonce": nonce, "ciphertext": ciphertext})

    @defer.inlineCallbacks
    def close(self):
        # Nothing waits any more: drop the pending waits and their timers.
        pending = list(self._replies.values()) + [d for _, d in self._watchers]
        self._replies.clear()
        del self._watchers[:]
        for d in pending:
            d.addErrback(lambda _: None)
            d.cancel()
        client = self.client
        if client is None:
            return
        if client.close_info is None:
            if client.state == client.STATE_OPEN:
                client.sendClose(1000)
            else:
                client.transport.abortConnection()
            timer = self.reactor.callLater(5, self._abort, client)
            yield client.closed
            if timer.active():
                timer.cancel()

    @staticmethod
    def _abort(client):
        if client.close_info is None and client.transport is not None:
            client.transport.abortConnection()


class RawUpgrade(tprotocol.Protocol):
    """
    A bare WebSocket upgrade request; C{status} fires with the HTTP status
    code of the answer (or C{None} when the connection closed first). An
    accepted connection is held open, silent, until C{transport} is closed.
    """

    def __init__(self, host, headers=None):
        self.host = host
        self.headers = headers or {}
        self.status = defer.Deferred()
        self.lost = defer.Deferred()
        self._buffer = b""

    def connectionMade(self):
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = ["GET /ws HTTP/1.1", "Host: " + self.host, "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
                 "Sec-WebSocket-Version: 13"]
        lines += ["%s: %s" % item for item in self.headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))

    def dataReceived(self, data):
        if self.status.called:
            return
        self._buffer += data
        if b"\r\n" in self._buffer:
            line = self._buffer.split(b"\r\n", 1)[0].split()
            code = int(line[1]) if len(line) > 1 and line[1].isdigit() else None
            self.status.callback(code)

    def connectionLost(self, reason):
        if not self.status.called:
            self.status.callback(None)
        self.lost.callback(None)


@defer.inlineCallbacks
def raw_upgrade(reactor, port, headers=None):
    """
    Attempt one upgrade; fires with C{(status, protocol)}.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    proto = yield connectProtocol(endpoint, RawUpgrade("127.0.0.1:%d" % (port,), headers))
    status = yield proto.status.addTimeout(10, reactor)
    return status, proto


@defer.inlineCallbacks
def close_raw(protos):
    for proto in protos:
        if not proto.lost.called:
            proto.transport.abortConnection()
            yield proto.lost


# -- a mesh made through the broker's own routes -------------------------------------


@defer.inlineCallbacks
def bootstrap_mesh(reactor, http_base, ws_url, names, mesh_name="soak", headers=None):
    """
    C{POST /meshes} for an owner, then one invite (asked for by the owner
    over the WebSocket, signed by the owner) used by C{POST /join} for each
    of C{names}. Fires with C{{name: Member}}, the owner under C{"owner"}.
    """
    owner_identity = crypto.Identity.generate()
    code, document = yield http(reactor, "POST", http_base + "/meshes",
                                messages.create_mesh_request(owner_identity, mesh_name, "owner",
                                                             now_ms(reactor)))
    if code != 200:
        raise HarnessError("POST /meshes answered %s %r" % (code, document))
    owner = Member("owner", owner_identity, document["meshId"], document["memberId"])
    members = {"owner": owner}
    if not names:
        return members
    peer = Peer(reactor, owner, ws_url, headers=headers)
    try:
        yield peer.connect(session_id="bootstrap", receive=False)
        reply = yield peer.request({"type": "create_invite", "maxUses": len(names),
                                    "expiresIn": 3600})
        if reply.get("type") != "invite_created":
            raise HarnessError("create_invite answered %r" % (reply,))
        token = encode_token(sign_invite(owner_identity, owner.mesh_id, mesh_name,
                                         reply["inviteId"], "member", reply["expiresAt"],
                                         ws_url))
        for name in names:
            identity = crypto.Identity.generate()
            code, document = yield http(
                reactor, "POST", http_base + "/join",
                messages.join_request(token, identity, name, now_ms(reactor)))
            if code != 200:
                raise HarnessError("POST /join answered %s %r" % (code, document))
            members[name] = Member(name, identity, owner.mesh_id, document["memberId"])
    finally:
        yield peer.close()
    return members


@defer.inlineCallbacks
def close_peers(peers):
    for peer in peers:
        yield peer.close()
