# -*- test-case-name: tests.test_floods -*-
"""
Floods (issue 8): an upgrade/hello flood from one address, a send flood from
one member, an error flood; the limits hold and an unaffected pair of peers
keeps getting every message. Over memory wires on a fake clock first, then
a short run of L{soak.scenarios.flood_run} against a real broker process
(flooders in processes of their own). No timing is asserted here: the
latency comparison is the soak's (C{make soak}).
"""

import os

from twisted.internet import reactor
from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.broker import ws
from soak import scenarios
from tests.meshfixture import WireConnection
from tests.test_limits import WireLimitTests


class FloodOverTheWireTests(WireLimitTests):
    settings = {"hello_rate_per_ip": 20, "max_connections_per_ip": 30,
                "send_rate_limit_per_min": 60, "send_rate_limit_burst": 10}

    def setUp(self):
        WireLimitTests.setUp(self)
        self.carol = self.fx.add_member(self.owner, "carol")
        self.dave = self.fx.add_member(self.owner, "dave")
        self.mallory = self.fx.add_member(self.owner, "mallory")
        self.carol_wire = self.hello(self.carol)
        self.dave_wire = self.hello(self.dave)
        self.exchanged = 0

    def hello(self, peer):
        wire = WireConnection(self.fx, self.factory)
        wire.send(peer.hello_dict())
        self.assertEqual(wire.last()["type"], "hello_ack")
        return wire

    def exchange(self):
        """
        carol sends dave one DM; dave acknowledges it.
        """
        self.exchanged += 1
        nonce, ciphertext = crypto.encrypt_direct(self.carol.identity, self.dave.pubkey,
                                                  b"ping %d" % (self.exchanged,))
        self.carol_wire.send({"type": "send", "id": "c%d" % (self.exchanged,),
                              "targetSpec": self.dave.pubkey, "nonce": nonce,
                              "ciphertext": ciphertext})
        pushes = [f for f in self.dave_wire.frames if f["type"] == "push" and "subtype" not in f]
        for push in pushes[-1:]:
            self.dave_wire.send({"type": "client_ack", "messageId": push["messageId"]})
        self.fx.clock.advance(1)

    def dave_got(self):
        return sorted(crypto.decrypt_direct(self.dave.identity, f["senderPubkey"], f["nonce"],
                                            f["ciphertext"]).decode()
                      for f in self.dave_wire.frames
                      if f["type"] == "push" and "subtype" not in f
                      and f["senderMemberPubkey"] == self.carol.pubkey)

    def test_upgrade_flood(self):
        """An upgrade flood from one address gets 429s; carol and dave keep talking."""
        statuses = []
        for _ in range(5):
            statuses += [self.upgrade()[0].status for _ in range(25)]
            self.exchange()
        self.assertEqual(statuses.count(101), 30)
        self.assertEqual(statuses.count(429), 95)
        self.assertEqual(len(self.dave_got()), 5)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_send_flood(self):
        """A send flood is answered rate_limit, then closed 1008 flood; others' messages arrive."""
        mallory = self.hello(self.mallory)
        nonce, ciphertext = crypto.encrypt_direct(self.mallory.identity, self.dave.pubkey, b"x")
        for n in range(200):
            mallory.client.send_frame({"type": "send", "id": "m%d" % (n,),
                                       "targetSpec": self.dave.pubkey, "nonce": nonce,
                                       "ciphertext": ciphertext})
        mallory.pump()
        for _ in range(5):
            self.exchange()
        outcomes = [f.get("error", "queued").split(":")[0]
                    for f in mallory.frames if f["type"] == "ack"]
        # The burst of 10 is accepted; refusals follow until the 100th
        # closes the flooder (refused sends count toward the error flood).
        # The 10 accepted were still committed, and delivered: their acks
        # may be lost with the closed connection (a retry with the same id
        # would get them back).
        self.assertEqual(outcomes.count("rate_limit"), ws.ERROR_FLOOD_COUNT)
        self.assertEqual(mallory.client.close_info, (True, 1008, "flood"))
        from_mallory = [f for f in self.dave_wire.frames if f["type"] == "push"
                        and f.get("senderMemberPubkey") == self.mallory.pubkey]
        self.assertEqual(len(from_mallory), 10)
        self.assertEqual(len(self.dave_got()), 5)

    def test_error_flood(self):
        """Bad frames close the flooder 1008 flood; its address gets 429s for the penalty,
        then is admitted again; others unaffected."""
        eve = WireConnection(self.fx, self.factory)
        for _ in range(ws.ERROR_FLOOD_COUNT):
            eve.client.sendMessage(b"{nope", isBinary=False)
        eve.pump()
        self.assertEqual(eve.client.close_info, (True, 1008, "flood"))
        # The wires all come from 127.0.0.1, the flooder's address.
        self.assertEqual(self.upgrade(host="127.0.0.1")[0].status, 429)
        for _ in range(int(ws.FLOOD_PENALTY_SECONDS)):
            self.exchange()
        self.assertEqual(self.upgrade(host="127.0.0.1")[0].status, 101)
        self.assertEqual(len(self.dave_got()), int(ws.FLOOD_PENALTY_SECONDS))
        self.assertIsNone(self.carol_wire.client.close_info)
        self.assertIsNone(self.dave_wire.client.close_info)

    def test_all_at_once(self):
        """All three floods at once: limits hold, no error logged, carol -> dave unaffected."""
        mallory = self.hello(self.mallory)
        nonce, ciphertext = crypto.encrypt_direct(self.mallory.identity, self.dave.pubkey, b"x")
        statuses, closes = [], []
        for round_ in range(4):
            statuses += [self.upgrade()[0].status for _ in range(10)]
            for n in range(50):
                if mallory.client.close_info is not None:
                    break
                mallory.client.send_frame({"type": "send", "id": "m%d-%d" % (round_, n),
                                           "targetSpec": self.dave.pubkey, "nonce": nonce,
                                           "ciphertext": ciphertext})
            mallory.pump()
            if round_ == 0:
                # Once: afterwards its address is refused (test_error_flood).
                eve = WireConnection(self.fx, self.factory)
                for _ in range(ws.ERROR_FLOOD_COUNT):
                    eve.client.sendMessage(b"[]", isBinary=False)
                eve.pump()
                closes.append(eve.client.close_info)
            self.exchange()
        self.assertIn(429, statuses)
        self.assertEqual(closes, [(True, 1008, "flood")])
        self.assertIn("rate_limit", [f.get("error", "").split(":")[0] for f in mallory.frames])
        self.assertEqual(mallory.client.close_info, (True, 1008, "flood"))
        self.assertEqual(self.dave_got(), ["ping %d" % (n,) for n in range(1, 5)])
        self.assertEqual(self.flushLoggedErrors(), [])


class RealFloodTests(unittest.TestCase):
    """
    A short L{scenarios.flood_run}: a real broker, flooders in their own
    processes, carol and dave measuring on the side.
    """

    timeout = 120

    def test_short_flood_run(self):
        """Real broker: floods meet 429s, rate_limit acks, 1008 closes; no probe message lost."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        d = scenarios.flood_run(reactor, workdir, probe_messages=20, flood_seconds=2.0)

        def check(figures):
            self.assertEqual(figures["baseline_arrived"], 20)
            self.assertEqual(figures["during_arrived"], 20)
            self.assertGreater(figures["upgrades"].get("429", 0), 0, figures)
            self.assertLessEqual(figures["upgrades"].get("101", 0), 50, figures)
            self.assertGreater(figures["send_flood"]["acks"].get("rate_limit", 0), 0, figures)
            # The first round is closed 1008 flood; later rounds from the
            # same address are refused (429) while it is penalised.
            closes = figures["error_flood"]["closes"]
            self.assertGreaterEqual(closes.get("1008 flood", 0), 1, figures)
            self.assertLessEqual(set(closes), {"1008 flood", "refused"}, figures)
            self.assertEqual(figures["broker_health"], 200)
            self.assertTrue(figures["broker_running"])

        return d.addCallback(check)

