"""
A flood generator in a process of its own, so that the latency the soak
measures on unaffected peers is the broker's, not the load generator's:

    python -m soak.flooder '<json config>'

prints one JSON object of counts on stdout when done. Modes:

- C{upgrades}: WebSocket upgrades from one (forwarded) address, accepted ones
  held open: counts HTTP statuses (101 accepted, 429 refused);
- C{sends}: one member sending DMs as fast as the C{tick} allows: counts acks
  by outcome (C{queued}, C{rate_limit}, other);
- C{errors}: connections that send bad frames until closed: counts the close
  codes (1008 C{flood} expected).
"""

import json
import sys

from twisted.internet import defer, task

from claudemesh import crypto
from soak.harness import ClientProtocol, Member, Peer, close_raw, raw_upgrade, sleep


@defer.inlineCallbacks
def upgrades(reactor, config):
    headers = {"X-Forwarded-For": config["xff"]}
    counts = {}
    held = []
    deadline = reactor.seconds() + config["duration"]
    while reactor.seconds() < deadline:
        attempts = [raw_upgrade(reactor, config["port"], headers)
                    for _ in range(config["per_tick"])]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        for ok, result in results:
            if not ok:
                counts["failed"] = counts.get("failed", 0) + 1
                continue
            status, proto = result
            counts[str(status)] = counts.get(str(status), 0) + 1
            if status == 101:
                held.append(proto)
        yield sleep(reactor, config["tick"])
    yield close_raw(held)
    return {"upgrades": counts}


@defer.inlineCallbacks
def sends(reactor, config):
    m = config["member"]
    member = Member(m["name"], crypto.Identity.from_secret_hex(m["secret"]), m["meshId"],
                    m["memberId"])
    target_key = config["target"]
    peer = Peer(reactor, member, config["url"], headers={"X-Forwarded-For": config["xff"]})
    yield peer.connect(session_id="flood", receive=False)
    nonce, ciphertext = crypto.encrypt_direct(member.identity, target_key, b"flood")
    sent = 0
    deadline = reactor.seconds() + config["duration"]
    while reactor.seconds() < deadline and peer.open:
        for _ in range(config["per_tick"]):
            sent += 1
            peer.client.send_frame({"type": "send", "id": "f%d" % (sent,),
                                    "targetSpec": target_key, "priority": "low",
                                    "nonce": nonce, "ciphertext": ciphertext})
        yield sleep(reactor, config["tick"])
    # Let the last answers arrive.
    yield sleep(reactor, 0.5)
    outcome = {}
    for ack in peer.acks.values():
        key = "queued" if ack.get("queued") else (ack.get("error") or "?").split(":")[0]
        outcome[key] = outcome.get(key, 0) + 1
    yield peer.close()
    return {"sent": sent, "acks": outcome}


@defer.inlineCallbacks
def errors(reactor, config):
    from autobahn.twisted.websocket import WebSocketClientFactory
    from twisted.internet.endpoints import TCP4ClientEndpoint

    closes = {}
    rounds = 0
    deadline = reactor.seconds() + config["duration"]
    host, port = config["url"].split("//", 1)[1].split("/", 1)[0].split(":")
    while reactor.seconds() < deadline:
        factory = WebSocketClientFactory(config["url"], reactor=reactor,
                                         headers={"X-Forwarded-For": config["xff"]})
        factory.protocol = ClientProtocol
        factory.noisy = False
        factory.setProtocolOptions(failByDrop=False)
        client = yield TCP4ClientEndpoint(reactor, host, int(port), timeout=5).connect(factory)
        opened = yield client.opened
        if opened is None:
            key = "refused"
        else:
            for _ in range(config.get("frames", 150)):
                if client.close_info is not None:
                    break
                client.sendMessage(b"{not json", isBinary=False)
            timer = reactor.callLater(5, client.transport.abortConnection)
            info = yield client.closed
            if timer.active():
                timer.cancel()
            key = "%s %s" % (info[1], info[2])
        rounds += 1
        closes[key] = closes.get(key, 0) + 1
        yield sleep(reactor, config["tick"])
    return {"rounds": rounds, "closes": closes}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0])
    mode = {"upgrades": upgrades, "sends": sends, "errors": errors}[config["mode"]]

    @defer.inlineCallbacks
    def run(reactor):
        counts = yield mode(reactor, config)
        sys.stdout.write(json.dumps(counts) + "\n")
        sys.stdout.flush()

    task.react(run)


if __name__ == "__main__":
    main()
