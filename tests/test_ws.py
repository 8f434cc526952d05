# -*- test-case-name: tests.test_ws -*-
"""
Tests for L{claudemesh.broker.ws}: the real L{BrokerServerProtocol} and a real
Autobahn client joined by in-memory transports (L{twisted.test.iosim}), with a
broker on an inline SQLite store and a L{task.Clock}. Nothing here touches the global
reactor: Autobahn's own timers (txaio) are pointed at the fixture's clock.
"""

import json

import txaio
from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.broker import ws
from claudemesh.broker.ws import BrokerServerFactory
from tests.meshfixture import BrokerFixture, WireConnection, result_of, store_snapshot


class WireTestCase(unittest.TestCase):
    """
    A mesh with an owner, alice and bob; clients connect over memory wires.
    """

    settings = {}

    def setUp(self):
        self.fx = BrokerFixture(**self.settings)
        # Autobahn schedules its timers through txaio's loop: the fake clock.
        self.patch(txaio.tx.config, "loop", self.fx.clock)
        self.factory = BrokerServerFactory(self.fx.broker, self.fx.clock, self.fx.settings)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")

    def wire(self):
        return WireConnection(self.fx, self.factory)

    def hello(self, peer, **kwargs):
        """
        A wire on which C{peer} said hello; returns it after the hello_ack.
        """
        wire = self.wire()
        wire.send(peer.hello_dict(**kwargs))
        self.assertEqual(wire.frames[-1]["type"], "hello_ack", wire.frames)
        return wire

    def snapshot(self):
        self.fx.flush()
        return store_snapshot(self.fx.store)

    def assertUnchanged(self, before):
        self.assertEqual(self.snapshot(), before)

    def assertOpen(self, wire):
        self.assertIsNone(wire.client.close_info)
        self.assertEqual(wire.server.state, wire.server.STATE_OPEN)


class HelloOverTheWireTests(WireTestCase):
    def test_hello_ack_echoes_req_id(self):
        """A valid hello is answered with hello_ack carrying the hello's _reqId."""
        wire = self.wire()
        wire.send(self.alice.hello_dict(_reqId="req-1"))
        [ack] = wire.frames
        self.assertEqual(ack["type"], "hello_ack")
        self.assertEqual(ack["_reqId"], "req-1")
        self.assertEqual(ack["memberId"], self.alice.member.id)
        self.assertEqual(ack["serverTime"], self.fx.now_ms())
        self.assertOpen(wire)

    def test_frame_before_hello(self):
        """A frame other than hello before hello gets error no_hello; the connection stays open."""
        wire = self.wire()
        before = self.snapshot()
        wire.send({"type": "send", "targetSpec": self.bob.pubkey, "nonce": "bm9uY2U=",
                   "ciphertext": "eA==", "_reqId": "r2"})
        self.assertEqual(wire.last(), {"type": "error", "code": "no_hello",
                                       "message": "must send hello first", "_reqId": "r2"})
        self.assertOpen(wire)
        self.assertUnchanged(before)
        # and a hello still works afterwards
        wire.send(self.alice.hello_dict())
        self.assertEqual(wire.last()["type"], "hello_ack")

    def test_second_hello(self):
        """A second hello on an authenticated connection is refused as invalid, nothing else."""
        wire = self.hello(self.alice)
        before = self.snapshot()
        wire.send(self.alice.hello_dict(_reqId="again"))
        self.assertEqual(wire.last()["code"], "invalid")
        self.assertEqual(wire.last()["_reqId"], "again")
        self.assertOpen(wire)
        self.assertUnchanged(before)

    def test_refused_hello_closes_1008_with_reason(self):
        """A hello with a bad signature gets error bad_signature, then close 1008 bad_signature."""
        wire = self.wire()
        before = self.snapshot()
        other = crypto.Identity.generate()
        now = self.fx.now_ms()
        signature = other.sign(crypto.hello_string(
            self.alice.mesh.id, self.alice.member.id, self.alice.pubkey, now))
        wire.send(self.alice.hello_dict(signature=signature, _reqId="h"))
        [error] = wire.frames
        self.assertEqual((error["type"], error["code"], error["_reqId"]),
                         ("error", "bad_signature", "h"))
        self.assertEqual(wire.client.close_info, (True, 1008, "bad_signature"))
        self.assertUnchanged(before)

    def test_timestamp_skew_closes_1008(self):
        """A hello 61 s off is refused with timestamp_skew and close 1008 timestamp_skew."""
        wire = self.wire()
        before = self.snapshot()
        wire.send(self.alice.hello_dict(timestamp=self.fx.now_ms() - 61_000))
        self.assertEqual(wire.frames[0]["code"], "timestamp_skew")
        self.assertEqual(wire.client.close_info, (True, 1008, "timestamp_skew"))
        self.assertUnchanged(before)

    def test_unauthorized_closes_1008(self):
        """A key that is no member of the mesh gets unauthorized and close 1008 unauthorized."""
        stranger = crypto.Identity.generate()
        self.alice.identity = stranger
        wire = self.wire()
        before = self.snapshot()
        wire.send(self.alice.hello_dict())
        self.assertEqual(wire.frames[0]["code"], "unauthorized")
        self.assertEqual(wire.client.close_info, (True, 1008, "unauthorized"))
        self.assertUnchanged(before)

    def test_revoked_closes_4002(self):
        """A revoked member gets error revoked with the exact message, then close 4002 banned."""
        self.fx.store.ban_member(self.alice.member.id, self.fx.now_ms())
        wire = self.wire()
        before = self.snapshot()
        wire.send(self.alice.hello_dict(_reqId="h"))
        self.assertEqual(wire.frames, [{
            "type": "error", "code": "revoked", "_reqId": "h",
            "message": 'You\'ve been removed from "team". Contact the mesh owner to rejoin.'}])
        self.assertEqual(wire.client.close_info, (True, 4002, "banned"))
        self.assertUnchanged(before)

    def test_session_replaced(self):
        """A second connection for the same session closes the first with 1000 session_replaced."""
        first = self.hello(self.alice, session_id="same")
        second = self.hello(self.alice, session_id="same")
        self.assertEqual(first.client.close_info, (True, 1000, "session_replaced"))
        self.assertEqual(second.last().get("restored"), True)
        self.assertOpen(second)
        # The replaced connection's close does not end the session.
        [session] = self.fx.broker.meshes.cached(self.alice.mesh.id).sessions.values()
        self.assertIs(session.connection, second.server)

    def test_clean_close_ends_session(self):
        """A client close 1000 ends the session at once: others get peer_left."""
        bob = self.hello(self.bob)
        alice = self.hello(self.alice)
        alice.close(1000)
        self.assertEqual(alice.client.close_info[:2], (True, 1000))
        [left] = [f for f in bob.frames if f.get("event") == "peer_left"]
        self.assertEqual(left["eventData"]["name"], "alice")

    def test_drop_keeps_grace(self):
        """A dropped transport leaves the session in grace: no peer_left until 90 s passed."""
        bob = self.hello(self.bob)
        alice = self.hello(self.alice)
        alice.server.transport.loseConnection()
        alice.pump()
        self.assertEqual([f for f in bob.frames if f.get("event") == "peer_left"], [])
        self.fx.advance(91)
        bob.pump()
        self.assertEqual(len([f for f in bob.frames if f.get("event") == "peer_left"]), 1)


class BadFrameTests(WireTestCase):
    def setUp(self):
        WireTestCase.setUp(self)
        self.wire_ = self.hello(self.alice)
        self.before = self.snapshot()

    def tearDown(self):
        self.assertUnchanged(self.before)

    def test_malformed_json(self):
        """Text that is not JSON is answered with error malformed; the connection stays open."""
        self.wire_.send_raw(b'{"type": "list_peers"')
        self.assertEqual(self.wire_.last()["code"], "malformed")
        self.assertOpen(self.wire_)

    def test_not_an_object(self):
        """A JSON value that is not an object is malformed."""
        self.wire_.send_raw(b"[1, 2]")
        self.assertEqual(self.wire_.last()["code"], "malformed")

    def test_not_utf8(self):
        """A text frame that is not UTF-8 is answered malformed; the connection stays open."""
        self.wire_.send_raw(json.dumps({"type": "list_peers"}).encode() + b"\xff")
        self.assertEqual(self.wire_.last()["code"], "malformed")
        self.assertIsNone(self.wire_.client.close_info)

    def test_wrong_field_type_names_field(self):
        """A field of the wrong type is malformed and the message names the field."""
        self.wire_.send({"type": "set_status", "status": 3, "_reqId": "s"})
        error = self.wire_.last()
        self.assertEqual((error["code"], error["_reqId"]), ("malformed", "s"))
        self.assertIn("'status'", error["message"])
        self.assertEqual(self.alice_session().status.status, "idle")

    def test_missing_field_names_field(self):
        """A missing required field is malformed and the message names it."""
        self.wire_.send({"type": "join_group"})
        self.assertEqual(self.wire_.last()["code"], "malformed")
        self.assertIn("'name'", self.wire_.last()["message"])

    def test_unknown_type(self):
        """An unknown type gets error unknown_type with the _reqId echoed."""
        self.wire_.send({"type": "teleport", "_reqId": "t"})
        self.assertEqual(self.wire_.last()["code"], "unknown_type")
        self.assertEqual(self.wire_.last()["_reqId"], "t")
        self.assertOpen(self.wire_)

    def test_type_not_a_string(self):
        """A frame whose type is not a string is malformed naming 'type'."""
        self.wire_.send({"type": 7})
        self.assertEqual(self.wire_.last()["code"], "malformed")
        self.assertIn("'type'", self.wire_.last()["message"])

    def test_binary_frame(self):
        """A binary frame is answered with error malformed; the connection stays open."""
        self.wire_.send_raw(b'{"type":"list_peers"}', binary=True)
        self.assertEqual(self.wire_.last()["code"], "malformed")
        self.assertOpen(self.wire_)

    def test_send_bad_priority_echoes_id(self):
        """A send with a bad priority is malformed naming priority, echoing the send's id."""
        self.wire_.send({"type": "send", "id": "c-9", "targetSpec": self.bob.pubkey,
                         "priority": "urgent", "nonce": "bm9uY2U=", "ciphertext": "eA=="})
        error = self.wire_.last()
        self.assertEqual((error["type"], error["code"], error["id"]), ("error", "malformed", "c-9"))
        self.assertIn("'priority'", error["message"])
        self.assertEqual(result_of(self.fx.store.count_queued()), 0)

    def test_refused_request_keeps_connection(self):
        """A refused request (set_status of another member's session) is error not_found, open."""
        self.hello(self.bob, session_id="bobs")
        self.before = self.snapshot()
        self.wire_.send({"type": "set_status", "status": "dnd", "sessionId": "bobs",
                         "_reqId": "x"})
        self.assertEqual((self.wire_.last()["code"], self.wire_.last()["_reqId"]),
                         ("not_found", "x"))
        self.assertOpen(self.wire_)

    def test_flood(self):
        """100 bad frames within 10 s close the connection with 1008 flood."""
        for _ in range(ws.ERROR_FLOOD_COUNT - 1):
            self.wire_.send_raw(b"nope")
        self.assertOpen(self.wire_)
        self.wire_.send_raw(b"nope")
        self.assertEqual(len([f for f in self.wire_.frames if f["type"] == "error"]),
                         ws.ERROR_FLOOD_COUNT)
        self.assertEqual(self.wire_.client.close_info, (True, 1008, "flood"))

    def test_slow_errors_are_no_flood(self):
        """Errors spread wider than the 10 s window do not count as a flood."""
        for _ in range(3):
            for _ in range(ws.ERROR_FLOOD_COUNT // 2):
                self.wire_.send_raw(b"nope")
            self.fx.clock.advance(ws.ERROR_FLOOD_SECONDS + 1)
            self.wire_.pump()
        self.assertOpen(self.wire_)

    def alice_session(self):
        return self.wire_.server._session


class DeliveryOverTheWireTests(WireTestCase):
    def test_dm_round_trip(self):
        """A DM sent over one wire arrives byte-identical on the other, and the ack echoes id."""
        alice = self.hello(self.alice)
        bob = self.hello(self.bob)
        nonce, ciphertext = crypto.encrypt_direct(self.alice.identity, self.bob.pubkey, b"hey")
        alice.send({"type": "send", "id": "c1", "targetSpec": self.bob.pubkey,
                    "priority": "now", "nonce": nonce, "ciphertext": ciphertext})
        [ack] = [f for f in alice.frames if f["type"] == "ack"]
        self.assertEqual((ack["id"], ack["queued"]), ("c1", True))
        [push] = [f for f in bob.frames if f["type"] == "push" and "subtype" not in f]
        self.assertEqual((push["nonce"], push["ciphertext"]), (nonce, ciphertext))
        self.assertEqual(push["messageId"], ack["messageId"])
        bob.send({"type": "client_ack", "messageId": push["messageId"]})
        self.assertEqual(result_of(self.fx.store.count_queued()), 0)

    def test_list_peers_reply(self):
        """list_peers is answered with peers_list echoing _reqId."""
        alice = self.hello(self.alice)
        self.hello(self.bob)
        alice.send({"type": "list_peers", "_reqId": "lp"})
        reply = alice.last()
        self.assertEqual((reply["type"], reply["_reqId"]), ("peers_list", "lp"))
        self.assertEqual(sorted(p["displayName"] for p in reply["peers"]), ["alice", "bob"])

    def test_unknown_target_ack(self):
        """A send to an unknown key is acked queued:false unknown_target; nothing stored."""
        alice = self.hello(self.alice)
        before = self.snapshot()
        alice.send({"type": "send", "id": "u1", "targetSpec": crypto.Identity.generate().pubkey,
                    "nonce": "bm9uY2U=", "ciphertext": "eA=="})
        self.assertEqual(alice.last(), {"type": "ack", "id": "u1", "messageId": "",
                                        "queued": False, "error": "unknown_target"})
        self.assertUnchanged(before)


class SendFloodTests(WireTestCase):
    def test_rate_limited_sends_count_as_flood(self):
        """A sender going on past its rate limit is closed 1008 flood after 100 refusals."""
        alice = self.hello(self.alice)
        nonce, ciphertext = crypto.encrypt_direct(self.alice.identity, self.bob.pubkey, b"x")
        for i in range(10 + 99):
            alice.send({"type": "send", "id": "f%d" % i, "targetSpec": self.bob.pubkey,
                        "nonce": nonce, "ciphertext": ciphertext})
        acks = [f for f in alice.frames if f["type"] == "ack"]
        self.assertEqual(sum(a["queued"] for a in acks), 10)
        self.assertIsNone(alice.client.close_info)
        alice.send({"type": "send", "id": "last", "targetSpec": self.bob.pubkey,
                    "nonce": nonce, "ciphertext": ciphertext})
        self.assertEqual(alice.client.close_info, (True, 1008, "flood"))
        # What was accepted stays accepted.
        self.assertEqual(result_of(self.fx.store.count_queued()), 10)


class LivenessTests(WireTestCase):
    settings = {"auto_ping_interval": 30, "auto_ping_timeout": 75}

    def test_ping_answered_keeps_connection(self):
        """A client that answers the broker's pings stays connected well past 75 s."""
        wire = self.hello(self.alice)
        for _ in range(20):
            self.fx.clock.advance(10)
            wire.pump()
        self.assertOpen(wire)

    def test_silent_client_dropped(self):
        """A client answering no ping is dropped after the 75 s timeout; its session is in grace."""
        wire = self.hello(self.alice)
        session = wire.server._session
        # Nothing moves on the wire: the broker's pings go unanswered.
        for _ in range(30 + 75 + 5):
            self.fx.clock.advance(1)
        self.assertTrue(wire.server.transport.disconnecting)
        wire.pump()
        self.assertIsNone(session.connection)
        self.assertIsNotNone(session.grace_call)
        mesh = self.fx.broker.meshes.cached(self.alice.mesh.id)
        self.assertIn(session.presence_id, mesh.sessions)


class FailedRequestTests(WireTestCase):
    def test_store_failure_answered(self):
        """A request the store fails on is answered error internal with its _reqId, logged once."""
        owner = self.hello(self.owner)
        self.hello(self.alice)
        sql = ("CREATE TRIGGER injected_failure BEFORE UPDATE ON members"
               " BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
        result_of(self.fx.store._connection.run(lambda connection: connection.execute(sql)))
        owner.send({"type": "ban", "target": "alice", "_reqId": "b1"})
        self.assertEqual(owner.last(), {
            "type": "error", "code": "internal", "_reqId": "b1",
            "message": "the broker could not complete this request"})
        self.assertOpen(owner)
        self.assertEqual(len(self.flushLoggedErrors()), 1)
