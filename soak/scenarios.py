"""
The fault and flood runs of issue 8. Each is a function of the reactor, a
working directory and its sizes, returning a dictionary of figures; the
checks the issue asks for are in the figures (C{lost}, C{phantom}, ...), so
that the short runs of the test suite and the long runs of C{python -m soak}
assert the same things.
"""

import json
import os
import shutil
import sys

from twisted.internet import defer, task
from twisted.internet import protocol as tprotocol

from soak.harness import (
    BrokerProcess,
    HarnessError,
    Peer,
    TemporaryPostgres,
    bootstrap_mesh,
    close_peers,
    http,
    percentile,
    sleep,
    wait_for_status,
)

NO_LIMITS = ["--send-rate-limit-per-min", "0", "--send-rate-limit-burst", "0",
             "--hello-rate-per-ip", "0"]


def _ids_of(texts, prefix):
    return {t[len(prefix):] for t in texts if t.startswith(prefix)}


@defer.inlineCallbacks
def wait_until(reactor, condition, timeout, interval=0.05):
    """
    Poll C{condition} until it is true; fires with C{False} after C{timeout}.
    """
    started = reactor.seconds()
    while not condition():
        if reactor.seconds() - started > timeout:
            return False
        yield sleep(reactor, interval)
    return True


# -- crash: kill -9 mid-burst ------------------------------------------------------


@defer.inlineCallbacks
def crash_run(reactor, workdir, messages=600, kill_after=150, chunk=60, interval=0.005,
              rate_per_min=30_000, burst=2000, deliver_timeout=30.0):
    """
    A sender bursts C{messages} DMs at an online recipient (past the burst
    the send rate limit refuses some: C{queued:false}, until the refusals
    close the sender 1008 flood); after C{kill_after} C{queued:true} acks, or
    once the sender is closed, the broker gets C{kill -9}. Restarted on the same data directory,
    the recipient reconnects. Figures: what was sent, acknowledged, refused,
    in flight, delivered, and the three checks: C{lost} (acknowledged, not
    delivered), C{phantom} (delivered, neither acknowledged nor in flight),
    C{refused_delivered}.
    """
    broker = BrokerProcess(reactor, workdir, args=[
        "--send-rate-limit-per-min", str(rate_per_min),
        "--send-rate-limit-burst", str(burst), "--hello-rate-per-ip", "0"])
    peers = []
    try:
        yield broker.start()
        members = yield bootstrap_mesh(reactor, broker.http, broker.url, ["bob"])
        owner, bob_member = members["owner"], members["bob"]
        bob = Peer(reactor, bob_member, broker.url)
        sender = Peer(reactor, owner, broker.url)
        peers += [bob, sender]
        yield bob.connect(session_id="bob")
        yield sender.connect(session_id="sender")

        killed = {}

        queued = []

        def watch(frame):
            if frame.get("type") == "ack" and frame.get("queued") and not killed:
                queued.append(frame)
                if len(queued) >= kill_after:
                    killed["at"] = reactor.seconds()
                    broker.kill()

        sender.listeners.append(watch)
        sent = []
        while len(sent) < messages and not killed and sender.open:
            for _ in range(min(chunk, messages - len(sent))):
                if not sender.open:
                    # Closed 1008 flood: it kept sending past its rate limit.
                    break
                n = len(sent)
                sender.send_dm(bob_member, "crash-%d" % (n,), "c%d" % (n,))
                sent.append(str(n))
            yield sleep(reactor, interval)
        if not killed:
            # Everything went out before enough acks came: kill as soon as
            # they have (or now, if they never do).
            yield wait_until(reactor, lambda: bool(killed) or not sender.open, 10)
            if not killed:
                killed["at"] = reactor.seconds()
        status = yield broker.kill()
        # Whatever the broker wrote before it died is read by now or soon.
        for peer in (bob, sender):
            yield peer.client.closed.addTimeout(10, reactor)
        answered_true = {k[1:] for k, a in sender.acks.items() if a.get("queued")}
        answered_false = {k[1:] for k, a in sender.acks.items() if not a.get("queued")}
        in_flight = set(sent) - answered_true - answered_false
        before = _ids_of(bob.received, "crash-")

        restart_seconds = yield broker.start()
        bob_again = Peer(reactor, bob_member, broker.url)
        peers.append(bob_again)
        yield bob_again.connect(session_id="bob")

        def delivered():
            return before | _ids_of(bob_again.received, "crash-")

        yield wait_until(reactor, lambda: answered_true <= delivered(), deliver_timeout)
        # Anything else that would arrive (in flight at the kill) has a moment.
        yield sleep(reactor, 1.0)
        got = delivered()
        return {
            "sent": len(sent),
            "acknowledged": len(answered_true),
            "refused": len(answered_false),
            "in_flight": len(in_flight),
            "delivered": len(got),
            "delivered_before_kill": len(before),
            "delivered_in_flight": len(got & in_flight),
            "duplicate_pushes": bob.pushes + bob_again.pushes - len(got),
            "lost": sorted(answered_true - got, key=int),
            "phantom": sorted(got - answered_true - in_flight, key=int),
            "refused_delivered": sorted(got & answered_false, key=int),
            "kill_status": status,
            "restart_seconds": round(restart_seconds, 2),
        }
    finally:
        yield close_peers(peers)
        if broker.running:
            yield broker.terminate()


# -- store outage: Postgres stopped mid-traffic ----------------------------------------


@defer.inlineCallbacks
def outage_run(reactor, workdir, pace=0.05, before=1.0, outage=3.0, after=1.0,
               deliver_timeout=30.0):
    """
    A throwaway Postgres under a broker; a sender sends a DM every C{pace}
    seconds to an online recipient. Postgres is stopped for C{outage}
    seconds past the moment C{/health/ready} turned 503, then started again.
    Figures: readiness before/during/after, time to 503 and back to 200, acks
    by outcome, C{false_queued} (C{queued:true} for a send made while the
    outage was visible, before Postgres came back: must be 0), C{lost}, and
    whether the broker's process stayed the same (no restart).
    """
    pg = TemporaryPostgres(reactor)
    broker = None
    peers = []
    loop = None
    try:
        yield pg.create()
        broker = BrokerProcess(reactor, workdir, args=NO_LIMITS, env={"DATABASE_URL": pg.url})
        yield broker.start()
        pid = broker.pid
        members = yield bootstrap_mesh(reactor, broker.http, broker.url, ["bob"])
        owner, bob_member = members["owner"], members["bob"]
        bob = Peer(reactor, bob_member, broker.url)
        sender = Peer(reactor, owner, broker.url)
        peers += [bob, sender]
        yield bob.connect(session_id="bob")
        yield sender.connect(session_id="sender")

        sent = []
        phase = {"name": "before"}
        sent_in = {}

        def send_one():
            if not sender.open:
                return
            n = str(len(sent))
            sent.append(n)
            sent_in[n] = phase["name"]
            sender.send_dm(bob_member, "outage-%s" % (n,), "o" + n)

        loop = task.LoopingCall(send_one)
        loop.clock = reactor
        loop.start(pace)
        yield sleep(reactor, before)
        ready_before, _ = yield http(reactor, "GET", broker.http + "/health/ready")

        phase["name"] = "stopping"
        yield pg.stop()
        to_503 = yield wait_for_status(reactor, broker.http + "/health/ready", 503, 30)
        phase["name"] = "outage"
        health_during, health_doc = yield http(reactor, "GET", broker.http + "/health")
        yield wait_until(reactor, lambda: any(
            str(a.get("error", "")).startswith("store_unavailable")
            for a in sender.acks.values()), 30)
        yield sleep(reactor, outage)
        phase["name"] = "restarting"
        yield pg.start()
        to_200 = yield wait_for_status(reactor, broker.http + "/health/ready", 200, 60)
        phase["name"] = "after"
        mark = len(sent)
        recovered = yield wait_until(reactor, lambda: any(
            sender.acks.get("o%d" % i, {}).get("queued") for i in range(mark, len(sent))), 30)
        yield sleep(reactor, after)
        loop.stop()
        loop = None
        yield wait_until(reactor, lambda: len(sender.acks) >= len(sent), 30)

        acked = {k[1:] for k, a in sender.acks.items() if a.get("queued")}
        refused = {k[1:]: a.get("error", "") for k, a in sender.acks.items()
                   if not a.get("queued")}
        yield wait_until(reactor, lambda: acked <= _ids_of(bob.received, "outage-"),
                          deliver_timeout)
        got = _ids_of(bob.received, "outage-")
        return {
            "sent": len(sent),
            "acknowledged": len(acked),
            "refused_store_unavailable": sum(1 for e in refused.values()
                                             if e.startswith("store_unavailable")),
            "refused_other": sorted({e for e in refused.values()
                                     if not e.startswith("store_unavailable")}),
            "unanswered": len(sent) - len(sender.acks),
            "delivered": len(got),
            "lost": sorted(acked - got, key=int),
            "refused_delivered": sorted(got & set(refused), key=int),
            "false_queued": sorted((n for n in acked if sent_in.get(n) == "outage"), key=int),
            "sent_during_outage": sum(1 for p in sent_in.values() if p == "outage"),
            "ready_before": ready_before,
            "health_during": (health_during, (health_doc or {}).get("db")),
            "seconds_to_503": round(to_503, 2),
            "seconds_to_ready": round(to_200, 2),
            "recovered_sends": recovered,
            "same_process": broker.pid == pid,
            "peak_rss_kb": broker.peak_rss_kb(),
        }
    finally:
        if loop is not None:
            loop.stop()
        yield close_peers(peers)
        if broker is not None and broker.running:
            yield broker.terminate()
        yield pg.destroy()


# -- slow consumer ---------------------------------------------------------------------


@defer.inlineCallbacks
def slow_consumer_run(reactor, workdir, message_bytes=32 * 1024, chunk=16,
                      max_total_bytes=400 * 1024 * 1024, deliver_timeout=60.0):
    """
    A recipient stops reading while a sender floods it with
    C{message_bytes} DMs; the broker (default 1 MiB outbound cap) must close
    it with 4003 and keep its deliveries queued. RSS of the broker before,
    at its highest while flooding, and after.
    """
    broker = BrokerProcess(reactor, workdir, args=NO_LIMITS)
    peers = []
    sampler = None
    try:
        yield broker.start()
        members = yield bootstrap_mesh(reactor, broker.http, broker.url, ["bob"])
        owner, bob_member = members["owner"], members["bob"]
        bob = Peer(reactor, bob_member, broker.url)
        sender = Peer(reactor, owner, broker.url)
        peers += [bob, sender]
        yield bob.connect(session_id="bob")
        yield sender.connect(session_id="sender")
        yield sleep(reactor, 1.0)
        rss_before = broker.rss_kb()
        peak = {"rss": rss_before}

        def sample():
            rss = broker.rss_kb()
            if rss is not None and rss > peak["rss"]:
                peak["rss"] = rss

        sampler = task.LoopingCall(sample)
        sampler.clock = reactor
        sampler.start(0.05)
        bob.client.transport.pauseProducing()
        sent = 0
        total = 0
        started = reactor.seconds()
        bob_online = True
        while bob_online and total < max_total_bytes:
            ids = []
            for _ in range(chunk):
                client_id = "s%d" % (sent,)
                sender.send_dm(bob_member, "slow-%d" % (sent,), client_id,
                               padding=message_bytes)
                ids.append(client_id)
                sent += 1
                total += message_bytes
            yield wait_until(reactor, lambda: all(i in sender.acks for i in ids), 30, 0.005)
            if sent % (chunk * 8) == 0:
                peers_list = yield sender.request({"type": "list_peers"})
                bob_online = any(p.get("memberPubkey") == bob_member.pubkey and p.get("online")
                                 for p in peers_list.get("peers", []))
        flood_seconds = reactor.seconds() - started
        yield sleep(reactor, 2.0)
        sampler.stop()
        sampler = None
        rss_after = broker.rss_kb()
        bob.client.transport.resumeProducing()
        close_info = yield bob.client.closed.addTimeout(15, reactor)
        acked = {k[1:] for k, a in sender.acks.items() if a.get("queued")}
        bob_again = Peer(reactor, bob_member, broker.url)
        peers.append(bob_again)
        yield bob_again.connect(session_id="bob")

        def delivered():
            return _ids_of(bob.received, "slow-") | _ids_of(bob_again.received, "slow-")

        yield wait_until(reactor, lambda: acked <= delivered(), deliver_timeout)
        got = delivered()
        return {
            "sent": sent,
            "sent_mib": round(total / 1048576.0, 1),
            "acknowledged": len(acked),
            "closed_while_flooding": not bob_online,
            "flood_seconds": round(flood_seconds, 2),
            "close": list(close_info),
            "delivered": len(got),
            "delivered_before_close": len(_ids_of(bob.received, "slow-")),
            "lost": sorted(acked - got, key=int),
            "rss_before_kb": rss_before,
            "rss_peak_kb": peak["rss"],
            "rss_after_kb": rss_after,
            "peak_rss_kb": broker.peak_rss_kb(),
        }
    finally:
        if sampler is not None:
            sampler.stop()
        yield close_peers(peers)
        if broker.running:
            yield broker.terminate()


# -- floods --------------------------------------------------------------------------------


class _Collect(tprotocol.ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


@defer.inlineCallbacks
def flooder(reactor, config, cpus=None):
    """
    Run L{soak.flooder} in its own process (pinned to C{cpus} when given);
    fires with its counts.
    """
    collect = _Collect()
    argv = [sys.executable, "-m", "soak.flooder", json.dumps(config)]
    if cpus and shutil.which("taskset"):
        argv = [shutil.which("taskset"), "-c", cpus] + argv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    reactor.spawnProcess(collect, argv[0], argv, env=env, path=root)
    code = yield collect.ended
    if code != 0:
        raise HarnessError("flooder %s failed (%s): %s" % (
            config["mode"], code, collect.err.decode("utf-8", "replace")[-2000:]))
    return json.loads(collect.out.decode("utf-8").strip().splitlines()[-1])


@defer.inlineCallbacks
def _probe(reactor, a, b, count, pace, tag, timeout=30.0):
    """
    C{count} DMs between peers C{a} and C{b}, alternating direction (so that
    each stays under its send rate limit), one every C{pace} seconds; fires
    with the latencies (send to push, seconds) and how many arrived.
    """
    sent = []
    for i in range(count):
        sender, recipient = (a, b) if i % 2 == 0 else (b, a)
        text = "%s-%d" % (tag, i)
        sender.send_dm(recipient.member, text, text)
        sent.append((sender, recipient, text))
        yield sleep(reactor, pace)
    yield wait_until(reactor, lambda: all(t in r.received for _, r, t in sent), timeout)
    latencies = [r.received[t] - s.sent_at[t] for s, r, t in sent if t in r.received]
    return latencies, sum(1 for _, r, t in sent if t in r.received)


def _ms(value):
    return None if value is None else round(value * 1000, 2)


@defer.inlineCallbacks
def flood_run(reactor, workdir, probe_messages=100, probe_pace=0.05, flood_seconds=None,
              upgrade_per_tick=10, send_per_tick=50, tick=0.05, max_connections_per_ip=50,
              hello_rate=20, floods=("upgrades", "sends", "errors"), pin=False):
    """
    Two unaffected peers (carol -> dave) measure DM latency, first alone
    (baseline), then while three flooders run from other addresses: an
    upgrade/hello flood, a send flood by a member, an error flood. The broker
    believes C{X-Forwarded-For} from 127.0.0.1 (C{--trusted-proxy}), so each
    flooder counts as its own address. Figures: latency p50/p99 baseline and
    during, what each flooder saw, and the broker's health and peak RSS.
    """
    if flood_seconds is None:
        flood_seconds = probe_messages * probe_pace + 1.0
    # With pin (and at least two CPUs) the broker gets CPU 0 to itself and
    # the flooders share the others: the latency measured is then the
    # broker's, not the machine's contention.
    broker_cpus = flood_cpus = None
    if pin and (os.cpu_count() or 1) >= 2:
        broker_cpus, flood_cpus = "0", "1-%d" % (os.cpu_count() - 1,)
    broker = BrokerProcess(reactor, workdir, args=[
        "--trusted-proxy", "127.0.0.1",
        "--max-connections-per-ip", str(max_connections_per_ip),
        "--hello-rate-per-ip", str(hello_rate),
        "--send-rate-limit-per-min", "1200", "--send-rate-limit-burst", "20"], cpus=broker_cpus)
    peers = []
    try:
        yield broker.start()
        members = yield bootstrap_mesh(reactor, broker.http, broker.url,
                                       ["carol", "dave", "mallory"],
                                       headers={"X-Forwarded-For": "192.0.2.1"})
        carol = Peer(reactor, members["carol"], broker.url,
                     headers={"X-Forwarded-For": "198.51.100.1"})
        dave = Peer(reactor, members["dave"], broker.url,
                    headers={"X-Forwarded-For": "198.51.100.2"})
        peers += [carol, dave]
        yield carol.connect(session_id="carol")
        yield dave.connect(session_id="dave")
        # Warm-up, then the baseline.
        yield _probe(reactor, carol, dave, 10, probe_pace, "warm")
        base, base_arrived = yield _probe(reactor, carol, dave, probe_messages, probe_pace,
                                          "base")
        mallory = members["mallory"]
        configs = {
            "upgrades": {"mode": "upgrades", "port": broker.port, "xff": "203.0.113.66",
                         "duration": flood_seconds, "per_tick": upgrade_per_tick,
                         "tick": tick},
            "sends": {"mode": "sends", "url": broker.url, "xff": "203.0.113.5",
                      "duration": flood_seconds, "per_tick": send_per_tick,
                      "tick": tick, "target": members["dave"].pubkey,
                      "member": {"name": "mallory", "secret": mallory.identity.secret_hex,
                                 "meshId": mallory.mesh_id, "memberId": mallory.member_id}},
            "errors": {"mode": "errors", "url": broker.url, "xff": "203.0.113.77",
                       "duration": flood_seconds, "tick": tick},
        }
        running = {name: flooder(reactor, configs[name], flood_cpus) for name in floods}
        # Give the flooders a moment to start up (a Python process each).
        yield sleep(reactor, 1.0)
        during, during_arrived = yield _probe(reactor, carol, dave, probe_messages, probe_pace,
                                              "during")
        results = yield defer.gatherResults(list(running.values()), consumeErrors=True)
        results = dict(zip(running, results))
        health, _ = yield http(reactor, "GET", broker.http + "/health")
        return {
            "floods": list(floods),
            "pinned": broker_cpus is not None,
            "probe_messages": probe_messages,
            "baseline_arrived": base_arrived,
            "during_arrived": during_arrived,
            "baseline_p50_ms": _ms(percentile(base, 50)),
            "baseline_p99_ms": _ms(percentile(base, 99)),
            "during_p50_ms": _ms(percentile(during, 50)),
            "during_p99_ms": _ms(percentile(during, 99)),
            "upgrades": results.get("upgrades", {}).get("upgrades"),
            "send_flood": results.get("sends"),
            "error_flood": results.get("errors"),
            "broker_health": health,
            "broker_running": broker.running,
            "peak_rss_kb": broker.peak_rss_kb(),
        }
    finally:
        yield close_peers(peers)
        if broker.running:
            yield broker.terminate()
