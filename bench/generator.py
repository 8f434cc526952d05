"""
The load generator: a separate asyncio process that drives a broker (or the
bench relay) over real WebSocket connections.

Run by the bench runner as ``python -m bench.generator`` with a JSON spec on
standard input; prints one JSON result object on the last line of standard
output. Every loop is bounded in count and in time: the generator stops by
itself when its scenario is done or its deadline passed.

What it does, for one scenario:

  1. setup (not measured): meshes created through ``POST /meshes`` with real
     ed25519 owner keys, an invite per mesh (``create_invite`` on the owner's
     connection, signed here with :mod:`claudemesh.invite`), members joined
     with ``join`` frames pipelined on a few pre-hello connections; against
     the relay the identities are only generated;
  2. every peer connects and says ``hello`` with a real signature;
  3. the measured phase (burst, steady, fanout or connections), with the
     broker's CPU time (``/proc/<pid>/stat``), RSS (``VmRSS``) and peak RSS
     (``VmHWM``, reset at the start of the phase when the kernel allows)
     sampled at its edges, and, when asked, ``py-spy record`` attached to
     the broker for exactly that phase.

Direct messages are crypto_box'ed with a precomputed shared key per pair of
peers (what a real client that caches its boxes does), broadcasts are
secretbox'ed under a mesh key. The plaintext carries the sender's index, a
per-sender counter and the send time, so every push is decrypted, checked and
timed; every push is confirmed with ``client_ack``. Duplicates are counted
twice: pushes that repeat a ``messageId`` (redeliveries a client drops) and
plaintexts seen under two message ids (duplicates an application would see).
"""

import asyncio
import base64
import collections
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import nacl.bindings as sodium
from picows import WSListener, WSMsgType, ws_connect

from claudemesh import crypto
from claudemesh import invite as invites

_b64 = base64.b64encode
_unb64 = base64.b64decode
_now_ns = time.perf_counter_ns
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PLAINTEXT_BYTES = 128


# -- the machine and the broker process ----------------------------------------


def raise_nofile(wanted=65536):
    """
    Raise RLIMIT_NOFILE as far as allowed (root may go past the hard limit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for value in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(value, soft), max(value, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid, name):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss(pid):
    """
    Reset VmHWM (``echo 5 > clear_refs``, Linux 4.0+); False when not allowed.
    """
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_busy_seconds():
    """
    CPU seconds spent on the whole machine (all cores, not idle or iowait).
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user.
    return (sum(values[:8]) - idle) / CLK_TCK


def database_cpu_seconds():
    """
    The CPU seconds of every running Postgres server process (its backends
    included), by pid: the database's share of a phase, which the broker's
    own CPU does not show.
    """
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % (name,)) as f:
                if f.read().strip() not in ("postgres", "postmaster"):
                    continue
            found[int(name)] = proc_cpu_seconds(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def own_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Probe:
    """
    The broker's CPU, RSS and the machine's busy time between two points.
    """

    def __init__(self, pid, pids=None, database=False):
        self.pid = pid
        self.database = database
        # Several broker processes (issue 15: --nodes, --workers): CPU and
        # RSS summed over all of them, peak RSS the largest.
        self.pids = pids or [pid]

    def _cpu(self):
        return sum(proc_cpu_seconds(p) for p in self.pids)

    def _kb(self, name, combine=sum):
        return combine(proc_status_kb(p, name) or 0 for p in self.pids)

    def start(self):
        self.db0 = database_cpu_seconds() if self.database else {}
        self.hwm_reset = all([reset_peak_rss(p) for p in self.pids])
        self.t0 = time.monotonic()
        self.cpu0 = self._cpu()
        self.rss0 = self._kb("VmRSS")
        self.busy0 = machine_busy_seconds()
        self.own0 = own_cpu_seconds()

    def stop(self):
        elapsed = time.monotonic() - self.t0
        database = None
        if self.database:
            # The processes there at both ends: the broker's connections
            # and the server's own workers.
            db1 = database_cpu_seconds()
            database = sum(db1[pid] - cpu for pid, cpu in self.db0.items() if pid in db1)
        return {
            "database_cpu_s": database,
            "elapsed_s": elapsed,
            "broker_cpu_s": self._cpu() - self.cpu0,
            "broker_processes": len(self.pids),
            "broker_rss_before_kb": self.rss0,
            "broker_rss_after_kb": self._kb("VmRSS"),
            "broker_peak_rss_kb": self._kb("VmHWM", max),
            "peak_rss_reset": self.hwm_reset,
            "generator_cpu_s": own_cpu_seconds() - self.own0,
            "machine_busy_cpu_s": machine_busy_seconds() - self.busy0,
        }


class Profiler:
    """
    ``py-spy record`` on the broker for the measured phase only.
    """

    def __init__(self, pid, path):
        self.proc = None
        if path:
            py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
            if not os.path.exists(py_spy):
                py_spy = "py-spy"
            try:
                self.proc = subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                     "--threads", "--nonblocking", "-o", path],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError as e:
                print("py-spy not started: %s" % (e,), file=sys.stderr)
            time.sleep(1.0)  # let it attach before the phase starts

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def percentiles(values_ns):
    """
    p50/p95/p99/max in milliseconds of a list of nanosecond durations.
    """
    if not values_ns:
        return None
    values = sorted(values_ns)
    n = len(values)

    def at(q):
        return values[min(n - 1, max(0, int(round(q * n)) - 1))] / 1e6

    return {"count": n, "p50": at(0.50), "p95": at(0.95), "p99": at(0.99),
            "max": values[-1] / 1e6, "mean": sum(values) / n / 1e6}


# -- a tiny HTTP client (mesh creation) -------------------------------------------


async def http_post(host, port, path, body, timeout=30.0):
    """
    One ``POST`` with ``Connection: close``; returns ``(status, JSON body)``.
    """
    data = json.dumps(body).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                     % (path.encode(), host.encode(), port, len(data)) + data)
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines[1:])}
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body_bytes = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body_bytes += rest[:size]
            rest = rest[size + 2:]
    else:
        body_bytes = rest
    return status, json.loads(body_bytes) if body_bytes else None


# -- peers and their connections --------------------------------------------------


class Listener(WSListener):
    def __init__(self, conn):
        self.conn = conn
        self.parts = None

    def on_ws_connected(self, transport):
        self.conn.transport = transport

    def on_ws_frame(self, transport, frame):
        kind = frame.msg_type
        if kind == WSMsgType.TEXT or kind == WSMsgType.CONTINUATION:
            if not frame.fin or self.parts is not None:
                if self.parts is None:
                    self.parts = []
                self.parts.append(frame.get_payload_as_bytes())
                if not frame.fin:
                    return
                payload, self.parts = b"".join(self.parts), None
            else:
                payload = frame.get_payload_as_bytes()
            self.conn.on_message(json.loads(payload))
        elif kind == WSMsgType.CLOSE:
            self.conn.close_code = frame.get_close_code()
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport):
        self.conn.disconnected()


class Conn:
    """
    One WebSocket connection with request/response by ``_reqId``.
    """

    def __init__(self, gen, peer=None):
        self.gen = gen
        self.peer = peer
        self.transport = None
        self.pending = {}
        self.next_req = 0
        self.close_code = None
        self.closed = False

    async def open(self, url, timeout=30.0):
        await asyncio.wait_for(
            ws_connect(lambda: Listener(self), url, websocket_handshake_timeout=timeout,
                       max_frame_size=1 << 24), timeout)

    def send_raw(self, data):
        self.transport.send(WSMsgType.TEXT, data)

    def request(self, frame, timeout=30.0):
        self.next_req += 1
        req = "r%d" % self.next_req
        frame["_reqId"] = req
        fut = asyncio.get_running_loop().create_future()
        self.pending[req] = fut
        self.send_raw(json.dumps(frame, separators=(",", ":")).encode())
        return asyncio.wait_for(fut, timeout)

    def on_message(self, msg):
        kind = msg.get("type")
        if kind == "ack":
            self.gen.on_ack(self.peer, msg)
        elif kind == "push":
            if msg.get("subtype") == "system":
                self.gen.system_pushes += 1
            else:
                self.gen.on_push(self.peer, msg)
        else:
            fut = self.pending.pop(msg.get("_reqId"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif kind == "error":
                self.gen.errors[msg.get("code")] += 1

    def disconnected(self):
        self.closed = True
        if self.peer is not None:
            self.gen.on_disconnect(self.peer)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed (%s)" % (self.close_code,)))
        self.pending.clear()

    def close(self):
        if self.transport is not None and not self.closed:
            self.transport.send_close(1000)
            self.transport.disconnect()


class Mesh:
    def __init__(self, index):
        self.index = index
        self.id = None
        self.name = "bench-%d" % (index,)
        self.key = crypto.new_mesh_key()
        self.peers = []


class Peer:
    def __init__(self, index, mesh, identity, member_id=None):
        self.index = index
        self.mesh = mesh
        self.identity = identity
        self.pubkey = identity.pubkey
        self.member_id = member_id
        self.curve_sk = identity.box_private_key().encode()
        self.curve_pk = crypto.box_public_key(self.pubkey).encode()
        self.conn = None
        self.sent = 0
        self.inflight = 0
        self.quota = 0


# -- the generator ------------------------------------------------------------------


class Generator:
    def __init__(self, spec):
        self.spec = spec
        self.url = spec["url"]
        # Issue 15: the nodes of a cluster; peer i connects to urls[i % n].
        self.urls = spec.get("urls") or [self.url]
        self.host, self.port = spec["host"], spec["port"]
        self.relay = spec["target"] == "relay"
        self.rng = random.Random(spec.get("seed", 7))
        self.peers = []
        self.by_pubkey = {}
        self.shared = {}
        self.errors = collections.Counter()
        self.ack_errors = collections.Counter()
        self.system_pushes = 0
        self.disconnects = 0
        self.measuring = False
        self.on_ack_hook = None
        self.reset_counts()

    def reset_counts(self):
        self.sent = 0
        self.acked = 0
        self.queued = 0
        self.pushes = 0
        self.dup_pushes = 0
        self.app_dups = 0
        self.decrypt_failures = 0
        self.unknown_pushes = 0
        self.sent_at = {}
        self.seen_ids = set()
        self.seen_plain = set()
        self.lat_ack = []
        self.lat_push = []
        # Issue 15, by whether sender and recipient are on one node.
        self.lat_push_same = []
        self.lat_push_cross = []
        self.first_send = None
        self.last_push = None
        self.last_ack = None

    # -- crypto ----------------------------------------------------------------

    def key_between(self, a, b):
        pair = (a.index, b.index) if a.index < b.index else (b.index, a.index)
        key = self.shared.get(pair)
        if key is None:
            key = self.shared[pair] = sodium.crypto_box_beforenm(b.curve_pk, a.curve_sk)
        return key

    def plaintext(self, peer, n, t):
        head = b"%d:%d:%d:" % (peer.index, n, t)
        return head + b"x" * (PLAINTEXT_BYTES - len(head))

    # -- sending -----------------------------------------------------------------

    def send_dm(self, peer, target):
        n = peer.sent
        peer.sent += 1
        t = _now_ns()
        nonce = os.urandom(24)
        sealed = sodium.crypto_box_easy_afternm(self.plaintext(peer, n, t), nonce,
                                                self.key_between(peer, target))
        cid = "%d-%d" % (peer.index, n)
        self.sent_at[cid] = t
        peer.conn.send_raw(
            b'{"type":"send","targetSpec":"%s","priority":"now","nonce":"%s",'
            b'"ciphertext":"%s","id":"%s"}'
            % (target.pubkey.encode(), _b64(nonce), _b64(sealed), cid.encode()))
        if self.first_send is None:
            self.first_send = t
        self.sent += 1
        peer.inflight += 1

    def send_broadcast(self, peer):
        n = peer.sent
        peer.sent += 1
        t = _now_ns()
        nonce = os.urandom(24)
        sealed = sodium.crypto_secretbox(self.plaintext(peer, n, t), nonce, peer.mesh.key)
        cid = "%d-%d" % (peer.index, n)
        self.sent_at[cid] = t
        peer.conn.send_raw(
            b'{"type":"send","targetSpec":"*","priority":"now","nonce":"%s",'
            b'"ciphertext":"%s","id":"%s"}' % (_b64(nonce), _b64(sealed), cid.encode()))
        if self.first_send is None:
            self.first_send = t
        self.sent += 1
        peer.inflight += 1

    def random_target(self, peer):
        peers = peer.mesh.peers
        while True:
            other = peers[self.rng.randrange(len(peers))]
            if other is not peer:
                return other

    # -- receiving ----------------------------------------------------------------

    def on_ack(self, peer, msg):
        now = _now_ns()
        t = self.sent_at.pop(msg.get("id"), None)
        if t is not None:
            self.lat_ack.append(now - t)
        self.acked += 1
        self.last_ack = now
        if msg.get("queued"):
            self.queued += 1
        else:
            self.ack_errors[msg.get("error")] += 1
        peer.inflight -= 1
        if self.on_ack_hook is not None:
            self.on_ack_hook(peer)

    def on_push(self, peer, msg):
        now = _now_ns()
        mid = msg["messageId"]
        ack = b'{"type":"client_ack","messageId":"%s"}' % mid.encode()
        # Per recipient: a broadcast reaches every peer under one id.
        seen = (peer.index, mid)
        if seen in self.seen_ids:
            self.dup_pushes += 1
            peer.conn.send_raw(ack)
            return
        self.seen_ids.add(seen)
        sender = self.by_pubkey.get(msg.get("senderPubkey"))
        if sender is None:
            self.unknown_pushes += 1
            peer.conn.send_raw(ack)
            return
        try:
            nonce, sealed = _unb64(msg["nonce"]), _unb64(msg["ciphertext"])
            if msg.get("targetSpec") == "*":
                plain = sodium.crypto_secretbox_open(sealed, nonce, peer.mesh.key)
            else:
                plain = sodium.crypto_box_open_easy_afternm(
                    sealed, nonce, self.key_between(peer, sender))
            s, n, t, _ = plain.split(b":", 3)
        except Exception:
            self.decrypt_failures += 1
            peer.conn.send_raw(ack)
            return
        key = (int(s), int(n), peer.index)
        if key in self.seen_plain:
            self.app_dups += 1
        else:
            self.seen_plain.add(key)
            self.pushes += 1
            self.lat_push.append(now - int(t))
            if len(self.urls) > 1:
                nodes = len(self.urls)
                (self.lat_push_same if sender.index % nodes == peer.index % nodes
                 else self.lat_push_cross).append(now - int(t))
            self.last_push = now
        peer.conn.send_raw(ack)

    def on_disconnect(self, peer):
        self.disconnects += 1

    # -- setup ----------------------------------------------------------------------

    async def setup_meshes(self, mesh_count, members, concurrency=32):
        """
        Meshes with ``members`` peers each (the owner included), their
        members created through the public API (or only generated, for the
        relay). Returns the list of L{Mesh}.
        """
        meshes = [Mesh(i) for i in range(mesh_count)]
        index = 0
        for mesh in meshes:
            for _ in range(members):
                peer = Peer(index, mesh, crypto.Identity.generate())
                index += 1
                mesh.peers.append(peer)
                self.peers.append(peer)
                self.by_pubkey[peer.pubkey] = peer
        if self.relay:
            for mesh in meshes:
                mesh.id = "relay-mesh-%d" % (mesh.index,)
                for peer in mesh.peers:
                    peer.member_id = "relay-member-%d" % (peer.index,)
            return meshes

        joiners = []
        for _ in range(min(8, mesh_count * 2)):
            conn = Conn(self)
            await conn.open(self.url)
            joiners.append(conn)
        semaphore = asyncio.Semaphore(concurrency)
        turn = [0]

        async def one(mesh):
            async with semaphore:
                owner = mesh.peers[0]
                ts = int(time.time() * 1000)
                status, body = await http_post(self.host, self.port, "/meshes", {
                    "name": mesh.name, "ownerPubkey": owner.pubkey, "displayName": "owner-%d" % (
                        owner.index,),
                    "timestamp": ts,
                    "signature": owner.identity.sign(
                        crypto.create_mesh_string(mesh.name, owner.pubkey, ts))})
                if status != 200:
                    raise RuntimeError("POST /meshes: %s %s" % (status, body))
                mesh.id, owner.member_id = body["meshId"], body["memberId"]
                if members == 1:
                    return
                conn = Conn(self)
                await conn.open(self.url)
                ack = await conn.request(self.hello_frame(owner))
                if ack.get("type") != "hello_ack":
                    raise RuntimeError("owner hello: %s" % (ack,))
                created = await conn.request({"type": "create_invite", "role": "member",
                                              "maxUses": members - 1, "expiresIn": 3600})
                conn.close()
                if created.get("type") != "invite_created":
                    raise RuntimeError("create_invite: %s" % (created,))
                token = invites.encode_token(invites.sign_invite(
                    owner.identity, mesh.id, mesh.name, created["inviteId"], "member",
                    created["expiresAt"], self.url))
                joins = []
                for peer in mesh.peers[1:]:
                    ts = int(time.time() * 1000)
                    name = "peer-%d" % (peer.index,)
                    conn = joiners[turn[0] % len(joiners)]
                    turn[0] += 1
                    joins.append(conn.request({
                        "type": "join", "invite": token, "pubkey": peer.pubkey,
                        "displayName": name, "timestamp": ts,
                        "signature": peer.identity.sign(
                            crypto.join_string(created["inviteId"], peer.pubkey, name, ts))}))
                for peer, reply in zip(mesh.peers[1:], await asyncio.gather(*joins)):
                    if reply.get("type") != "join_ack":
                        raise RuntimeError("join: %s" % (reply,))
                    peer.member_id = reply["memberId"]

        await asyncio.gather(*(one(mesh) for mesh in meshes))
        for conn in joiners:
            conn.close()
        return meshes

    def hello_frame(self, peer):
        ts = int(time.time() * 1000)
        return {"type": "hello", "meshId": peer.mesh.id, "memberId": peer.member_id,
                "pubkey": peer.pubkey, "sessionId": "bench-%d" % (peer.index,),
                "timestamp": ts, "pid": os.getpid(), "cwd": "/bench",
                "signature": peer.identity.sign(
                    crypto.hello_string(peer.mesh.id, peer.member_id, peer.pubkey, ts))}

    async def connect_peers(self, peers, concurrency=200, timeout=120.0):
        """
        Connect and hello every peer, ``concurrency`` at a time. Returns the
        connect→hello_ack durations (ns) and the failures.
        """
        semaphore = asyncio.Semaphore(concurrency)
        durations = []
        failures = collections.Counter()

        async def one(peer):
            async with semaphore:
                t = _now_ns()
                try:
                    conn = Conn(self, peer)
                    await conn.open(self.urls[peer.index % len(self.urls)])
                    peer.conn = conn
                    ack = await conn.request(self.hello_frame(peer))
                    if ack.get("type") != "hello_ack":
                        failures[ack.get("code", ack.get("type"))] += 1
                        return
                    durations.append(_now_ns() - t)
                except Exception as e:
                    failures[type(e).__name__] += 1

        await asyncio.wait_for(asyncio.gather(*(one(p) for p in peers)), timeout)
        return durations, failures

    # -- waiting ----------------------------------------------------------------------

    async def wait_until(self, condition, deadline):
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return condition()

    def delivery_report(self, expected_pushes, elapsed_ns):
        return {
            "sent": self.sent,
            "acked": self.acked,
            "queued": self.queued,
            "ack_errors": dict(self.ack_errors),
            "expected_pushes": expected_pushes,
            "pushes": self.pushes,
            "lost": max(0, expected_pushes - self.pushes),
            "delivered_pct": 100.0 * self.pushes / expected_pushes if expected_pushes else 0.0,
            "duplicate_pushes": self.dup_pushes,
            "duplicates_to_app": self.app_dups,
            "decrypt_failures": self.decrypt_failures,
            "unknown_pushes": self.unknown_pushes,
            "send_to_ack_ms": percentiles(self.lat_ack),
            "send_to_push_ms": percentiles(self.lat_push),
            "active_s": elapsed_ns / 1e9,
        } | ({"send_to_push_same_node_ms": percentiles(self.lat_push_same),
              "send_to_push_cross_node_ms": percentiles(self.lat_push_cross),
              "nodes": len(self.urls)} if len(self.urls) > 1 else {})


# -- scenarios -------------------------------------------------------------------------


async def prepare_one_mesh(gen, spec):
    t = time.monotonic()
    [mesh] = await gen.setup_meshes(1, spec["peers"])
    durations, failures = await gen.connect_peers(mesh.peers)
    if failures:
        raise RuntimeError("hello failures: %s" % (dict(failures),))
    # Let the peer_joined presence pushes settle.
    await asyncio.sleep(1.0)
    return mesh, time.monotonic() - t


def finish_phase(gen, probe, profiler):
    metrics = probe.stop()
    profiler.stop()
    return metrics


async def scenario_burst(gen, spec, probe):
    mesh, setup_s = await prepare_one_mesh(gen, spec)
    per_peer, window = spec["messages"], spec["window"]
    profiler = Profiler(probe.pid, spec.get("profile"))
    gen.reset_counts()

    def next_send(peer):
        if peer.sent < per_peer and peer.inflight < window:
            gen.send_dm(peer, gen.random_target(peer))

    gen.on_ack_hook = next_send
    total = per_peer * len(mesh.peers)
    probe.start()
    for peer in mesh.peers:
        for _ in range(min(window, per_peer)):
            gen.send_dm(peer, gen.random_target(peer))
    deadline = time.monotonic() + spec["timeout"]
    await gen.wait_until(lambda: gen.acked >= total, deadline)
    await gen.wait_until(lambda: gen.pushes + gen.app_dups >= gen.queued, deadline)
    metrics = finish_phase(gen, probe, profiler)
    # Late pushes (redeliveries) for a short while after the phase.
    end = (gen.last_push or _now_ns())
    elapsed = max(end, gen.last_ack or 0) - gen.first_send
    await asyncio.sleep(spec.get("linger", 1.0))
    report = gen.delivery_report(gen.queued, elapsed)
    report.update(metrics)
    report.update({"setup_s": setup_s, "peers": len(mesh.peers), "window": window,
                   "messages": gen.queued, "throughput_per_s": gen.pushes / (elapsed / 1e9)
                   if elapsed else 0.0, "timed_out": gen.acked < total})
    return report


async def scenario_steady(gen, spec, probe):
    mesh, setup_s = await prepare_one_mesh(gen, spec)
    rate, duration, cap = spec["rate"], spec["duration"], spec["window"]
    profiler = Profiler(probe.pid, spec.get("profile"))
    gen.reset_counts()
    peers = mesh.peers
    skipped = 0
    turn = 0
    probe.start()
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= duration:
            break
        due = int(rate * elapsed)
        while gen.sent + skipped < due:
            peer = peers[turn % len(peers)]
            turn += 1
            if peer.inflight >= cap:
                skipped += 1
                continue
            gen.send_dm(peer, gen.random_target(peer))
        await asyncio.sleep(0.001)
    offered_s = time.monotonic() - start
    deadline = time.monotonic() + spec["timeout"]
    await gen.wait_until(lambda: gen.acked >= gen.sent, deadline)
    await gen.wait_until(lambda: gen.pushes + gen.app_dups >= gen.queued, deadline)
    metrics = finish_phase(gen, probe, profiler)
    elapsed = max(gen.last_push or 0, gen.last_ack or 0) - gen.first_send
    await asyncio.sleep(spec.get("linger", 1.0))
    report = gen.delivery_report(gen.queued, elapsed)
    report.update(metrics)
    report.update({"setup_s": setup_s, "peers": len(peers), "offered_rate": rate,
                   "achieved_send_rate": gen.sent / offered_s, "skipped_window_full": skipped,
                   "messages": gen.queued,
                   "throughput_per_s": gen.pushes / (elapsed / 1e9) if elapsed else 0.0,
                   "timed_out": gen.acked < gen.sent})
    return report


async def scenario_fanout(gen, spec, probe):
    mesh, setup_s = await prepare_one_mesh(gen, spec)
    per_peer, window = spec["messages"], spec["window"]
    profiler = Profiler(probe.pid, spec.get("profile"))
    gen.reset_counts()

    def next_send(peer):
        if peer.sent < per_peer and peer.inflight < window:
            gen.send_broadcast(peer)

    gen.on_ack_hook = next_send
    total = per_peer * len(mesh.peers)
    probe.start()
    for peer in mesh.peers:
        for _ in range(min(window, per_peer)):
            gen.send_broadcast(peer)
    deadline = time.monotonic() + spec["timeout"]
    recipients = len(mesh.peers) - 1
    await gen.wait_until(lambda: gen.acked >= total, deadline)
    await gen.wait_until(lambda: gen.pushes + gen.app_dups >= gen.queued * recipients, deadline)
    metrics = finish_phase(gen, probe, profiler)
    elapsed = max(gen.last_push or 0, gen.last_ack or 0) - gen.first_send
    await asyncio.sleep(spec.get("linger", 1.0))
    report = gen.delivery_report(gen.queued * recipients, elapsed)
    report.update(metrics)
    report.update({"setup_s": setup_s, "peers": len(mesh.peers), "window": window,
                   "messages": gen.queued, "broadcasts": gen.queued,
                   "pushes_per_s": gen.pushes / (elapsed / 1e9) if elapsed else 0.0,
                   "throughput_per_s": gen.pushes / (elapsed / 1e9) if elapsed else 0.0,
                   "timed_out": gen.acked < total})
    return report


async def scenario_connections(gen, spec, probe):
    t = time.monotonic()
    meshes = await gen.setup_meshes(spec["meshes"], spec["peers"])
    setup_s = time.monotonic() - t
    peers = [p for m in meshes for p in m.peers]
    # The meshes are in the broker's memory now (the owners said hello):
    # settle, then measure only the connections.
    await asyncio.sleep(1.0)
    profiler = Profiler(probe.pid, spec.get("profile"))
    gen.reset_counts()
    probe.start()
    start = time.monotonic()
    durations, failures = await gen.connect_peers(
        peers, concurrency=spec["concurrency"], timeout=spec["timeout"])
    hello_s = time.monotonic() - start
    # Idle: let presence pushes and group commits settle, then read RSS.
    await asyncio.sleep(spec.get("idle", 3.0))
    metrics = finish_phase(gen, probe, profiler)
    open_conns = sum(1 for p in peers if p.conn is not None and not p.conn.closed)
    connected = len(durations)
    growth = metrics["broker_rss_after_kb"] - metrics["broker_rss_before_kb"]
    report = {
        "setup_s": setup_s,
        "peers": len(peers),
        "meshes": len(meshes),
        "connected": connected,
        "still_open": open_conns,
        "failures": dict(failures),
        "hello_s": hello_s,
        "hellos_per_s": connected / hello_s if hello_s else 0.0,
        "throughput_per_s": connected / hello_s if hello_s else 0.0,
        "connect_to_hello_ack_ms": percentiles(durations),
        "rss_growth_kb": growth,
        "rss_per_connection_kb": growth / connected if connected else None,
        "messages": connected,
        "system_pushes": gen.system_pushes,
    }
    report.update(metrics)
    return report


SCENARIOS = {
    "burst": scenario_burst,
    "steady": scenario_steady,
    "fanout": scenario_fanout,
    "connections": scenario_connections,
}


async def run(spec):
    gen = Generator(spec)
    probe = Probe(spec["pid"], spec.get("pids"), database=spec.get("database_cpu", False))
    try:
        return await asyncio.wait_for(SCENARIOS[spec["scenario"]](gen, spec, probe),
                                      spec["timeout"] + 600)
    finally:
        for peer in gen.peers:
            if peer.conn is not None:
                peer.conn.close()
        await asyncio.sleep(0.2)


def main():
    spec = json.loads(sys.stdin.read())
    spec["nofile"] = raise_nofile()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        loop_name = "uvloop"
        result = uvloop.run(run(spec))
    else:
        loop_name = "asyncio"
        result = asyncio.run(run(spec))
    result["generator_loop"] = loop_name
    result["generator_nofile"] = spec["nofile"]
    result["generator_total_cpu_s"] = own_cpu_seconds()
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
