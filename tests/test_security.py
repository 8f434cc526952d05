# -*- test-case-name: tests.test_security -*-
"""
The attacks of issue 11 ("Security holes found by an outside attack run"),
one test case per item, each a test that failed on the broker before its fix.

Frames in, frames out and rows in the store: over memory wires
(L{twisted.test.iosim}) on a fake clock where the store plays no part, and
over real sockets against a broker on SQLite and on Postgres where it does
(those are the only tests here on the global reactor; each closes every
connection it opens).
"""

import base64
import gc
import json
import os

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel
from twisted.trial import unittest

from claudemesh import crypto, protocol
from claudemesh.broker.groupcommit import GroupCommit
from claudemesh.invite import encode_token, sign_invite
from claudemesh.store.postgres import PostgresStore
from claudemesh.store.records import (
    AuditEvent,
    ClaimRequest,
    MemberRecord,
    MeshRecord,
    NewDelivery,
    NewMessage,
    SessionRecord,
)
from claudemesh.store.sqlite import SQLiteStore
from tests import pg
from tests.meshfixture import Peer, result_of
from tests.test_e2e import EndToEndMixin, _RealClock
from tests.test_ws import WireTestCase

PG_DSN, PG_SKIP = pg.postgres_dsn_or_skip_reason()


class OnSQLite:
    """
    A test case on an SQLite file store (the same file each time
    C{make_store} is called, as a restarted broker would reopen it).
    """

    def make_store(self):
        if not hasattr(self, "db_path"):
            self.db_path = self.mktemp() + ".sqlite3"
        return SQLiteStore(self.db_path, reactor)


class OnPostgres:
    """
    A test case on a Postgres schema of its own, dropped after the test.
    """

    skip = PG_SKIP

    def setUp(self):
        # Registered first, so it runs last: after the store is closed.
        self.schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, self.schema)
        return super().setUp()

    def make_store(self):
        return PostgresStore(PG_DSN, self.schema, reactor)


def session_claim(thief, session_pubkey, **extra):
    """
    A hello of C{thief} presenting C{session_pubkey} with a proof signed by
    its own member key (any member can sign one for any key).
    """
    return thief.hello_dict(
        session_id=extra.pop("session_id", "thief"), sessionPubkey=session_pubkey,
        sessionSignature=thief.identity.sign(crypto.session_proof_string(
            thief.mesh.id, thief.pubkey, session_pubkey)), **extra)


def dm_frame(sender_identity, recipient_key, plaintext, client_id=None):
    nonce, ciphertext = crypto.encrypt_direct(sender_identity, recipient_key, plaintext)
    frame = {"type": "send", "targetSpec": recipient_key, "nonce": nonce,
             "ciphertext": ciphertext}
    if client_id is not None:
        frame["id"] = client_id
    return frame


def connected(case, peer, **kwargs):
    """
    A wire on which C{peer} said hello (pushes may follow the hello_ack).
    """
    wire = case.wire()
    wire.send(peer.hello_dict(**kwargs))
    case.assertEqual(wire.frames[0]["type"], "hello_ack", wire.frames)
    return wire


def pushes(wire):
    return [f for f in wire.frames if f["type"] == "push" and "subtype" not in f]


# -- item 1: someone else's session key ----------------------------------------------


class SessionKeyTheftTests(WireTestCase):
    """
    Item 1: a session key belongs to exactly one (mesh, member); a claim by
    anyone else is refused, and nothing of the owner's reaches the claimant.
    """

    def setUp(self):
        WireTestCase.setUp(self)
        self.other_owner = self.fx.create_mesh(name="other")
        self.mallory = self.fx.add_member(self.other_owner, "mallory")

    def assertRefused(self, wire):
        self.assertEqual([(f["type"], f.get("code")) for f in wire.frames],
                         [("error", "bad_session_pubkey")])
        self.assertEqual(wire.client.close_info, (True, 1008, "bad_session_pubkey"))

    def test_live_key_of_another_member(self):
        """Alice presenting bob's live session key (proved by her own key) is bad_session_pubkey."""
        bob = self.hello(self.bob, session_key=True)
        key = self.bob.session_identity.pubkey
        thief = self.wire()
        thief.send(session_claim(self.alice, key))
        self.assertRefused(thief)
        owner = self.hello(self.owner, session_id="owner")
        owner.send(dm_frame(self.owner.identity, key, b"for bob's session"))
        [push] = pushes(bob)
        self.assertEqual(crypto.decrypt_direct(self.bob.session_identity, push["senderPubkey"],
                                               push["nonce"], push["ciphertext"]),
                         b"for bob's session")
        self.assertEqual(pushes(thief), [])

    def test_key_of_another_mesh_gets_none_of_its_dms(self):
        """Another mesh's member claiming a key with queued DMs is refused; the owner gets them."""
        bob = self.hello(self.bob, session_key=True)
        key = self.bob.session_identity.pubkey
        bob.close()
        owner = self.hello(self.owner, session_id="owner")
        owner.send(dm_frame(self.owner.identity, key, b"while you were away", "d1"))
        ack = owner.last()
        self.assertTrue(ack["queued"], ack)
        thief = self.wire()
        thief.send(session_claim(self.mallory, key))
        self.assertRefused(thief)
        self.assertEqual(pushes(thief), [])
        owner.send({"type": "message_status", "messageId": ack["messageId"], "_reqId": "s"})
        self.assertEqual([r["status"] for r in owner.last()["recipients"]], ["queued"])
        bob = connected(self, self.bob, session_key=True)
        [push] = pushes(bob)
        self.assertEqual((push["messageId"], push["meshId"]),
                         (ack["messageId"], self.owner.mesh.id))
        bob.send({"type": "client_ack", "messageId": push["messageId"]})
        owner.send({"type": "message_status", "messageId": ack["messageId"], "_reqId": "s"})
        self.assertEqual([r["status"] for r in owner.last()["recipients"]], ["delivered"])

    def test_key_stays_bound_after_its_session_ended(self):
        """The binding outlives the session: once bob's session ended alice still cannot take it."""
        bob = self.hello(self.bob, session_key=True)
        key = self.bob.session_identity.pubkey
        bob.close()
        self.fx.advance(200)
        thief = self.wire()
        thief.send(session_claim(self.alice, key))
        self.assertRefused(thief)

    def test_same_member_may_reuse_its_key(self):
        """Another session of the member that owns the key may present it again."""
        self.hello(self.bob, session_key=True)
        key = self.bob.session_identity.pubkey
        self.hello(self.bob, session_id="s2", sessionPubkey=key,
                   sessionSignature=self.bob.identity.sign(crypto.session_proof_string(
                       self.bob.mesh.id, self.bob.pubkey, key)))

    def test_ack_of_a_foreign_delivery_changes_nothing(self):
        """A client_ack for a message meant for another member leaves its delivery queued."""
        owner = self.hello(self.owner, session_id="owner")
        owner.send(dm_frame(self.owner.identity, self.bob.pubkey, b"for bob", "d1"))
        message_id = owner.last()["messageId"]
        alice = self.hello(self.alice)
        mallory = self.hello(self.mallory)
        for wire in (alice, mallory):
            wire.send({"type": "client_ack", "messageId": message_id})
        self.fx.flush()
        [row] = result_of(self.fx.store.message_deliveries(message_id))
        self.assertEqual(row.state, "queued")


class SessionKeyTheftOverSocketsMixin(EndToEndMixin):
    """
    Item 1 on a real store: the cross-mesh theft of the attack run, and the
    binding surviving a broker restart.
    """

    @defer.inlineCallbacks
    def second_mesh(self):
        now = _RealClock.now_ms()
        identity = crypto.Identity.generate()
        mesh = MeshRecord("mesh-b-%d" % (id(self),), "other", "other-%d" % (id(self),),
                          identity.pubkey, now)
        owner = MemberRecord("own-b-%d" % (id(self),), mesh.id, identity.pubkey, "ob",
                             "owner", now)
        yield self.store.create_mesh(mesh, owner)
        return Peer(_RealClock(), mesh, owner, identity)

    @defer.inlineCallbacks
    def refused(self, hello):
        client = yield self.connect()
        client.send_frame(hello)
        was_clean, code, reason = yield client.closed
        self.assertEqual(([f.get("code") for f in client.frames], code, reason),
                         (["bad_session_pubkey"], 1008, "bad_session_pubkey"))

    @defer.inlineCallbacks
    def test_cross_mesh_claim(self):
        """Mesh B's member presenting mesh A's session key is refused and gets none of A's DMs."""
        mallory = yield self.second_mesh()
        bob = yield self.hello(self.bob, session_key=True)
        key = self.bob.session_identity.pubkey
        bob.sendClose(1000)
        yield bob.closed
        alice = yield self.hello(self.alice)
        alice.send_frame(dm_frame(self.alice.identity, key, b"to the session", "q1"))
        ack = yield self.next_frame(alice, "ack")
        self.assertTrue(ack["queued"], ack)
        yield self.refused(session_claim(mallory, key))
        yield self.broker.writes.flushed()
        [row] = yield self.store.message_deliveries(ack["messageId"])
        self.assertEqual((row.state, row.attempts), ("queued", 0))
        bob = yield self.hello(self.bob, session_key=True)
        push = yield self.next_frame(bob, "push")
        self.assertEqual((push["messageId"], push["meshId"]), (ack["messageId"], self.bob.mesh.id))
        self.assertEqual(crypto.decrypt_direct(self.bob.session_identity, push["senderPubkey"],
                                               push["nonce"], push["ciphertext"]),
                         b"to the session")

    @defer.inlineCallbacks
    def test_binding_survives_restart(self):
        """After a broker restart another member still cannot take a session key bound before."""
        bob = yield self.hello(self.bob, session_key=True)
        key = self.bob.session_identity.pubkey
        bob.sendClose(1000)
        yield bob.closed
        yield self.stop_broker()
        yield self.start_broker()
        yield self.refused(session_claim(self.alice, key))


class SessionKeyTheftSQLiteTests(OnSQLite, SessionKeyTheftOverSocketsMixin, unittest.TestCase):
    pass


class SessionKeyTheftPostgresTests(OnPostgres, SessionKeyTheftOverSocketsMixin,
                                   unittest.TestCase):
    pass


# -- item 2: one DM that wedges an inbox --------------------------------------------------


class OversizedPushTests(WireTestCase):
    """
    Item 2: a send just under the frame limit is accepted, and its push (a
    few hundred bytes larger) is delivered; a push a connection cannot take
    never stops the ones behind it.
    """

    LIMIT = 4096
    settings = {"max_message_bytes": LIMIT, "send_rate_limit_per_min": 0,
                "send_rate_limit_burst": 0}

    def largest_send(self, recipient_key, client_id):
        """
        A send frame of exactly the inbound limit.
        """
        frame = {"type": "send", "targetSpec": recipient_key, "nonce": "bm9uY2U=",
                 "ciphertext": "", "id": client_id}
        frame["ciphertext"] = "A" * (self.LIMIT - len(json.dumps(frame).encode()))
        self.assertEqual(len(json.dumps(frame).encode()), self.LIMIT)
        return frame

    def test_largest_send_to_live_session(self):
        """A send at the limit to a live recipient is pushed, and so is the next message."""
        bob = self.hello(self.bob)
        alice = self.hello(self.alice)
        alice.send(self.largest_send(self.bob.pubkey, "big"))
        self.assertTrue(alice.last()["queued"], alice.last())
        alice.send(dm_frame(self.alice.identity, self.bob.pubkey, b"after", "small"))
        got = pushes(bob)
        self.assertEqual(len(got), 2, [len(json.dumps(p)) for p in got])
        self.assertGreater(len(json.dumps(got[0], separators=(",", ":"))), self.LIMIT)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_largest_send_queued_then_claimed(self):
        """Queued while bob is away, the push at the limit arrives on reconnect, and later ones."""
        alice = self.hello(self.alice)
        alice.send(self.largest_send(self.bob.pubkey, "big"))
        alice.send(dm_frame(self.alice.identity, self.bob.pubkey, b"after", "small"))
        bob = connected(self, self.bob)
        self.assertEqual(len(pushes(bob)), 2)
        bob.close()
        alice.send(dm_frame(self.alice.identity, self.bob.pubkey, b"later", "later"))
        bob = connected(self, self.bob)
        self.assertEqual(len(pushes(bob)), 3)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_oversized_fragmented_message_closes_1009(self):
        """A message over the limit sent in small fragments is still closed with 1009."""
        alice = self.hello(self.alice)
        payload = json.dumps({"type": "list_peers", "pad": "x" * self.LIMIT}).encode()
        alice.client.beginMessage(isBinary=False)
        for start in range(0, len(payload), 1000):
            alice.client.sendMessageFrame(payload[start:start + 1000])
        alice.client.endMessage()
        alice.pump()
        self.assertEqual(alice.client.close_info[1], 1009)

    def test_push_a_connection_refuses_does_not_stop_the_outbox(self):
        """A push the connection cannot send is skipped: the others arrive, it comes again later."""
        alice = self.hello(self.alice)
        for i in range(3):
            alice.send(dm_frame(self.alice.identity, self.bob.pubkey, b"m%d" % i, "c%d" % i))
        refused = alice.frames[-3]["messageId"]
        bob = self.wire()
        sent = bob.server.send_encoded

        def send_encoded(payload):
            if refused.encode() in payload and b'"push"' in payload:
                raise ValueError("frame too large for this connection")
            return sent(payload)

        bob.server.send_encoded = send_encoded
        bob.send(self.bob.hello_dict())
        self.assertEqual(len(pushes(bob)), 2)
        alice.send(dm_frame(self.alice.identity, self.bob.pubkey, b"m3", "c3"))
        self.assertEqual(len(pushes(bob)), 3)
        for push in pushes(bob):
            bob.send({"type": "client_ack", "messageId": push["messageId"]})
        bob.server.send_encoded = sent
        self.fx.advance(self.fx.settings.lease_seconds + 6)
        bob.pump()
        self.assertEqual(pushes(bob)[-1]["messageId"], refused)
        self.assertEqual(self.flushLoggedErrors(), [])


# -- item 3: NUL bytes --------------------------------------------------------------------

KEY = "a" * 64
SIG = "b" * 128
# One valid frame of every type: each of its strings gets a NUL in turn.
SAMPLE_FRAMES = {
    "hello": {"meshId": "m1", "memberId": "u1", "pubkey": KEY, "signature": SIG,
              "sessionId": "s1", "cwd": "/w", "displayName": "al",
              "sessionPubkey": KEY, "sessionSignature": SIG, "claudeSessionId": "c1",
              "hostname": "h", "channel": "c", "model": "m",
              "groups": [{"name": "team", "role": "lead"}]},
    "send": {"targetSpec": KEY, "nonce": "n", "ciphertext": "c", "id": "i"},
    "client_ack": {"messageId": "m1"},
    "set_status": {"status": "idle", "sessionId": "s1"},
    "set_summary": {"summary": "s", "sessionId": "s1"},
    "list_peers": {},
    "join_group": {"name": "team", "role": "lead"},
    "leave_group": {"name": "team"},
    "message_status": {"messageId": "m1"},
    "audit_query": {"eventType": "peer_joined"},
    "audit_verify": {},
    "join": {"invite": "tok", "pubkey": KEY, "displayName": "al", "timestamp": 1,
             "signature": SIG},
    "create_invite": {},
    "list_invites": {},
    "revoke_invite": {"inviteId": "i1"},
    "set_role": {"target": "bob", "role": "admin"},
    "leave": {},
    "list_members": {},
    "disconnect": {"target": "bob"},
    "kick": {"target": "bob"},
    "ban": {"target": "bob"},
    "unban": {"target": "bob"},
    "list_bans": {},
    "rotate_mesh_key": {"epoch": 1, "reason": "ban", "sealedKeys": [
        {"memberPubkey": KEY, "sealedKey": "QUJD" * 30}]},
    "share_mesh_key": {"epoch": 1, "sealedKeys": [
        {"memberPubkey": KEY, "sealedKey": "QUJD" * 30}]},
    "get_mesh_key": {"epoch": 1},
    "mesh_key_status": {},
}


# Fields the protocol passes through for the broker to refuse with a code of
# their own (docs/protocol.md): a hello's sessionPubkey that is not 64 hex is
# bad_session_pubkey (checked over the wire below).
NUL_REFUSED_LATER = {("hello", ("sessionPubkey",))}


def string_paths(value, path=()):
    """
    The paths of every string inside a JSON value.
    """
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from string_paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from string_paths(item, path + (index,))


def with_nul(frame, path):
    frame = json.loads(json.dumps(frame))
    holder = frame
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = holder[path[-1]][:1] + "\x00" + holder[path[-1]][1:]
    return frame


class NulBytesTests(WireTestCase):
    """
    Item 3: text holding U+0000 (which Postgres cannot store) is refused as
    malformed in every field of every frame, and never reaches the store.
    """

    def test_samples_cover_every_frame_type(self):
        """The NUL check below covers every inbound frame type."""
        self.assertEqual(set(SAMPLE_FRAMES), set(protocol.FRAME_TYPES))

    def test_nul_in_every_text_field_is_malformed(self):
        """A NUL in any string of any frame (but type) is error malformed naming that field."""
        checked = 0
        for type_name, sample in SAMPLE_FRAMES.items():
            frame = dict(sample, type=type_name, _reqId="r")
            protocol.decode(json.dumps(frame))
            for path in string_paths(frame):
                if path == ("type",) or (type_name, path) in NUL_REFUSED_LATER:
                    continue
                try:
                    protocol.decode(json.dumps(with_nul(frame, path)))
                except protocol.Refusal as e:
                    caught = e
                else:
                    self.fail("NUL accepted in %s %r" % (type_name, path))
                self.assertEqual(caught.code, "malformed", (type_name, path))
                self.assertIn(repr(path[0]), caught.message, (type_name, path))
                checked += 1
        self.assertGreater(checked, 40)

    def test_nul_client_ack_over_the_wire(self):
        """client_ack {messageId:"\\u0000"} is answered malformed and counts toward the flood."""
        alice = self.hello(self.alice)
        alice.send_raw(b'{"type":"client_ack","messageId":"\\u0000"}')
        self.assertEqual((alice.last()["type"], alice.last()["code"]), ("error", "malformed"))
        for _ in range(protocol_flood_count() - 1):
            alice.client.sendMessage(b'{"type":"client_ack","messageId":"\\u0000"}')
        alice.pump()
        self.assertEqual(alice.client.close_info, (True, 1008, "flood"))

    def test_nul_session_pubkey_over_the_wire(self):
        """A hello whose sessionPubkey holds a NUL is bad_session_pubkey, nothing stored."""
        before = self.snapshot()
        wire = self.wire()
        wire.send(self.alice.hello_dict(sessionPubkey="a" * 31 + "\x00" + "a" * 32,
                                        sessionSignature="b" * 128))
        self.assertEqual([f.get("code") for f in wire.frames], ["bad_session_pubkey"])
        self.assertUnchanged(before)

    def test_ids_must_have_the_id_shape(self):
        """Broker-made ids (messageId, inviteId, meshId, memberId) off the id shape: malformed."""
        for type_name, field_name in (("client_ack", "messageId"), ("message_status", "messageId"),
                                      ("revoke_invite", "inviteId"), ("hello", "meshId"),
                                      ("hello", "memberId")):
            for bad in ("a|b", "a b", "claudemesh-create/1", "é"):
                frame = dict(SAMPLE_FRAMES[type_name], type=type_name)
                frame[field_name] = bad
                with self.assertRaises(protocol.Refusal) as caught:
                    protocol.decode(json.dumps(frame))
                self.assertIn(repr(field_name), caught.exception.message)


def protocol_flood_count():
    from claudemesh.broker.ws import ERROR_FLOOD_COUNT

    return ERROR_FLOOD_COUNT


class BatchRefusalMixin:
    """
    Item 3, the group commit: a batch the store refuses for one write's data
    is written without that write; nobody else's writes are lost. C{bad}
    is a session update the store refuses.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.make_store()
        yield self.store.open()
        self.addCleanup(self.store.close)
        self.writes = GroupCommit(self.store, reactor)
        now = self.now = _RealClock.now_ms()
        self.mesh = MeshRecord("mesh-g", "g", "g", "ok", now)
        self.owner = MemberRecord("own-g", self.mesh.id, "ok", "o", "owner", now)
        self.bob = MemberRecord("bob-g", self.mesh.id, "bk", "b", "member", now)
        yield self.store.create_mesh(self.mesh, self.owner)
        yield self.store.add_member(self.bob)

    def session(self, presence_id):
        return SessionRecord(presence_id, self.mesh.id, self.bob.id, presence_id, "b", 1, "/",
                             self.now)

    def message(self, message_id):
        return NewMessage(message_id, self.mesh.id, self.owner.id, "ok", "ok", "bk", "next",
                          "n", "c", self.now, self.now + 60_000,
                          deliveries=(NewDelivery(self.bob.id),))

    @defer.inlineCallbacks
    def test_one_refused_write_spares_the_batch(self):
        """Messages, sessions, acks, releases and audit events survive one refused write."""
        first = self.message("m-first")
        yield self.store.enqueue([first])
        yield self.store.open_sessions([self.session("p-old")])
        yield self.store.claim_deliveries(ClaimRequest(
            self.bob.id, None, "p-old", (), ("next",), self.now, 30_000, 10))
        # All queued in one reactor turn: one batch.
        self.writes.open_session(self.session("p-new"))
        sent = self.writes.enqueue(self.message("m-second"),
                                   AuditEvent(self.mesh.id, "message_sent", self.owner.id,
                                              {"bytes": 1}, self.now))
        self.writes.audit(AuditEvent(self.mesh.id, "invite_created", self.owner.id,
                                     {"inviteId": "i1"}, self.now))
        self.bad(self.writes, "p-new")
        self.writes.update_session("p-new", {"summary": "fine"})
        self.writes.ack(first.id, self.bob.id, self.bob.id)
        self.writes.release_leases("p-old")
        self.writes.close_session("p-old", self.now + 1)
        result = yield sent
        self.assertEqual(result.message_id, "m-second")
        yield self.writes.flushed()
        [row] = yield self.store.message_deliveries(first.id)
        self.assertEqual(row.state, "delivered")
        [row] = yield self.store.message_deliveries("m-second")
        self.assertEqual(row.state, "queued")
        [session] = yield self.store.list_open_sessions(self.mesh.id)
        self.assertEqual((session.presence_id, session.summary, session.status),
                         ("p-new", "fine", "idle"))
        entries, _ = yield self.store.audit_entries(self.mesh.id, 10, 0)
        self.assertEqual(sorted(e.event_type for e in entries),
                         ["invite_created", "message_sent"])
        self.assertTrue((yield self.store.verify_chain(self.mesh.id)).valid)
        # Logged as one line, without a traceback.
        self.assertEqual(self.flushLoggedErrors(), [])

    def bad(self, writes, presence_id):
        # A status the schema's CHECK constraint refuses, on every backend.
        writes.update_session(presence_id, {"status": "bogus"})


class BatchRefusalSQLiteTests(OnSQLite, BatchRefusalMixin, unittest.TestCase):
    pass


class BatchRefusalPostgresTests(OnPostgres, BatchRefusalMixin, unittest.TestCase):
    def bad(self, writes, presence_id):
        # What the attack run sent: text Postgres cannot hold.
        writes.update_session(presence_id, {"summary": "a\x00b"})


class NulFloodOverSocketsMixin(EndToEndMixin):
    """
    Item 3 end to end: one mesh's member floods NUL acknowledgements while
    another mesh's owner sends and invites; every send is queued and the
    audit keeps its invite_created.
    """

    @defer.inlineCallbacks
    def test_nul_acks_do_not_fail_another_mesh(self):
        """NUL client_acks from mesh A leave all of mesh B's sends queued and its audit whole."""
        other = yield SessionKeyTheftOverSocketsMixin.second_mesh(self)
        carol_identity = crypto.Identity.generate()
        carol = MemberRecord("carol-%d" % (id(self),), other.mesh.id, carol_identity.pubkey,
                             "carol", "member", _RealClock.now_ms())
        yield self.store.add_member(carol)
        flooder = yield self.hello(self.alice)
        owner_b = yield self.hello(other)
        nul_ack = b'{"type":"client_ack","messageId":"\\u0000"}'
        for i in range(5):
            for _ in range(8):
                flooder.sendMessage(nul_ack)
            owner_b.send_frame(dm_frame(other.identity, carol.pubkey, b"m%d" % i, "b%d" % i))
            ack = yield self.next_frame(owner_b, "ack")
            self.assertEqual((ack["id"], ack["queued"]), ("b%d" % i, True), ack)
        owner_b.send_frame({"type": "create_invite", "_reqId": "inv"})
        invite = yield self.next_frame(owner_b, "invite_created")
        yield self.broker.writes.flushed()
        entries, _ = yield self.store.audit_entries(other.mesh.id, 50, 0)
        self.assertIn(invite["inviteId"], [e.payload.get("inviteId") for e in entries
                                           if e.event_type == "invite_created"])
        self.assertEqual(self.flushLoggedErrors(), [])


class NulFloodSQLiteTests(OnSQLite, NulFloodOverSocketsMixin, unittest.TestCase):
    pass


class NulFloodPostgresTests(OnPostgres, NulFloodOverSocketsMixin, unittest.TestCase):
    pass


# -- item 4: replies that outgrow the frame limit ---------------------------------------


class ReplySizeTests(WireTestCase):
    """
    Item 4: every reply fits the frame limit: long lists come in pages
    (C{nextCursor}, C{nextOffset} for the audit), an entry too large on its
    own comes shortened (C{truncated: true}).
    """

    LIMIT = 16384
    settings = {"max_message_bytes": LIMIT, "send_rate_limit_per_min": 0,
                "send_rate_limit_burst": 0, "max_connections_per_mesh": 0}

    def setUp(self):
        WireTestCase.setUp(self)
        self.owner_wire = self.hello(self.owner, session_id="owner")

    def assertFits(self, frame):
        """
        The frame, without its echoed _reqId, is within the frame limit.
        """
        body = dict(frame)
        body.pop("_reqId", None)
        self.assertLessEqual(len(protocol.encode(body)), self.LIMIT)

    def pages(self, wire, request, reply_type, key, cursor_field="cursor",
              next_field="nextCursor"):
        """
        Ask for every page of a list; returns the entries and the replies.
        """
        entries, replies = [], []
        frame = dict(request, _reqId="p")
        for _ in range(100):
            wire.send(frame)
            reply = wire.last()
            self.assertEqual(reply["type"], reply_type, reply)
            self.assertFits(reply)
            replies.append(reply)
            entries.extend(reply[key])
            if next_field not in reply:
                return entries, replies
            frame = dict(frame, **{cursor_field: reply[next_field]})
        self.fail("no last page")

    def big_hello(self, peer, session_id):
        return peer.hello_dict(
            session_id=session_id, cwd="/" + "c" * 3999, hostname="h" * 255,
            groups=[{"name": "g%03d%s" % (i, "x" * 100), "role": "r"} for i in range(64)])

    def test_peers_list_in_pages(self):
        """Six sessions with every field near its limit are all listed, in frames that fit."""
        wires = []
        for i in range(6):
            wire = self.wire()
            wire.send(self.big_hello(self.alice, "big%d" % i))
            self.assertEqual(wire.frames[0]["type"], "hello_ack")
            wire.send({"type": "set_summary", "summary": "s" * 1024})
            wires.append(wire)
        peers, replies = self.pages(self.owner_wire, {"type": "list_peers"}, "peers_list",
                                    "peers")
        self.assertGreater(len(replies), 1)
        self.assertEqual(sorted(p["sessionId"] for p in peers),
                         ["big%d" % i for i in range(6)] + ["owner"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_peer_too_large_alone_is_shortened(self):
        """A peer whose entry alone exceeds the limit is listed shortened, marked truncated."""
        wire = self.wire()
        hello = self.alice.hello_dict(session_id="huge", cwd="/" + "\u20ac" * 4000)
        wire.send_raw(json.dumps(hello, ensure_ascii=False).encode())
        self.assertEqual(wire.frames[0]["type"], "hello_ack", wire.frames[0])
        wire.send({"type": "set_summary", "summary": "\x01" * 1024})
        peers, _ = self.pages(self.owner_wire, {"type": "list_peers"}, "peers_list", "peers")
        [huge] = [p for p in peers if p["sessionId"] == "huge"]
        self.assertTrue(huge["truncated"])
        self.assertEqual(huge["pubkey"], self.alice.pubkey)

    def test_audit_query_in_pages(self):
        """audit_query {limit:500} over 450 events answers in frames that fit, with nextOffset."""
        alice = self.hello(self.alice)
        for i in range(450):
            alice.client.sendMessage(json.dumps(dm_frame(
                self.alice.identity, self.bob.pubkey, b"x", "a%d" % i)).encode())
        alice.pump()
        entries, replies = self.pages(self.owner_wire, {"type": "audit_query", "limit": 500},
                                      "audit_result", "entries", "offset", "nextOffset")
        self.assertGreater(len(replies), 1)
        self.assertEqual(len(entries), replies[0]["total"])
        seqs = [e["seq"] for e in entries]
        self.assertEqual(seqs, sorted(seqs, reverse=True))
        self.assertEqual(len(set(seqs)), len(seqs))

    def test_members_invites_and_bans_in_pages(self):
        """members_list, invites_list and list_bans_result page through hundreds of rows."""
        for i in range(150):
            self.fx.add_member(self.owner, "member-%03d-%s" % (i, "m" * 40))
        for i in range(150):
            self.owner_wire.client.sendMessage(json.dumps(
                {"type": "create_invite", "maxUses": 3}).encode())
        self.owner_wire.pump()
        banned = [self.fx.add_member(self.owner, "banned-%03d-%s" % (i, "b" * 40))
                  for i in range(150)]
        for peer in banned:
            result_of(self.fx.store.ban_member(peer.member.id, self.fx.now_ms()))
        self.fx.broker.meshes._meshes.clear()
        owner = self.hello(self.owner, session_id="owner2")
        members, replies = self.pages(owner, {"type": "list_members"}, "members_list",
                                      "members")
        self.assertGreater(len(replies), 1)
        self.assertEqual(len(members), 153)
        invites, replies = self.pages(owner, {"type": "list_invites"}, "invites_list",
                                      "invites")
        self.assertGreater(len(replies), 1)
        self.assertEqual(len({i["inviteId"] for i in invites}), 150)
        bans, replies = self.pages(owner, {"type": "list_bans"}, "list_bans_result", "bans")
        self.assertGreater(len(replies), 1)
        self.assertEqual(len(bans), 150)

    def test_message_status_in_pages(self):
        """message_status of a message to 300 recipients pages through them."""
        recipients = [self.fx.add_member(self.owner, "r%03d" % i) for i in range(300)]
        now = self.fx.now_ms()
        message = NewMessage(
            "m-many", self.owner.mesh.id, self.owner.member.id, self.owner.pubkey,
            self.owner.pubkey, "*", "next", "n", "c", now, now + 60_000,
            deliveries=tuple(NewDelivery(r.member.id) for r in recipients))
        result_of(self.fx.store.enqueue([message]))
        rows, replies = self.pages(self.owner_wire, {"type": "message_status",
                                                     "messageId": "m-many"},
                                   "message_status_result", "recipients")
        self.assertGreater(len(replies), 1)
        self.assertEqual(sorted(r["pubkey"] for r in rows),
                         sorted(r.pubkey for r in recipients))

    def test_bad_cursor_is_malformed(self):
        """A cursor the broker did not make is error malformed, the connection stays open."""
        for bad in ("nope", "[1]", '["a", 1, 2]', "{}"):
            self.owner_wire.send({"type": "list_peers", "cursor": bad, "_reqId": "c"})
            self.assertEqual((self.owner_wire.last()["type"], self.owner_wire.last()["code"]),
                             ("error", "malformed"))
        self.assertOpen(self.owner_wire)


# -- item 5: join_group without a cap -----------------------------------------------------


class GroupCapTests(WireTestCase):
    """
    Item 5: a session holds at most 64 groups, however it joined them.
    """

    def test_join_group_capped_at_64(self):
        """The 65th distinct join_group is too_many_groups; joining a held one again is fine."""
        alice = self.hello(self.alice, groups=["g%d" % i for i in range(60)])
        for i in range(60, 64):
            alice.send({"type": "join_group", "name": "g%d" % i})
        alice.send({"type": "join_group", "name": "one-too-many", "_reqId": "j"})
        self.assertEqual((alice.last()["code"], alice.last()["_reqId"]),
                         ("too_many_groups", "j"))
        alice.send({"type": "join_group", "name": "g3", "role": "lead"})
        [session] = self.fx.broker.meshes.cached(self.alice.mesh.id).sessions_of(
            self.alice.member.id)
        self.assertEqual(len(session.groups), 64)
        self.assertEqual(session.groups["g3"], "lead")
        self.assertNotIn("one-too-many", session.groups)
        self.assertOpen(alice)


# -- item 6: integers without bounds ------------------------------------------------------


class IntegerBoundsTests(WireTestCase):
    """
    Item 6: every integer field is bounded; one out of bounds is malformed.
    """

    def test_audit_offset_huge(self):
        """audit_query with offset 10^30 or 2^63 is error malformed (it got no reply)."""
        owner = self.hello(self.owner)
        for offset in (10**30, 2**63, 2**53):
            owner.send({"type": "audit_query", "offset": offset, "_reqId": "a"})
            self.assertEqual((owner.last()["type"], owner.last().get("code")),
                             ("error", "malformed"), owner.last())
        owner.send({"type": "audit_query", "offset": 2**53 - 1, "_reqId": "a"})
        self.assertEqual((owner.last()["type"], owner.last()["entries"]), ("audit_result", []))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_every_integer_field_bounded(self):
        """Each integer field of each frame refuses 2^53 and -(2^53) as malformed."""
        integer_fields = {"audit_query": ["limit", "offset"], "hello": ["pid"],
                          "join": ["timestamp"], "create_invite": ["maxUses", "expiresIn"],
                          "disconnect": ["stale"], "kick": ["stale"]}
        for type_name, names in integer_fields.items():
            for name in names:
                for value in (2**53, -(2**53), 10**30):
                    frame = dict(SAMPLE_FRAMES[type_name], type=type_name)
                    frame.pop("target", None)
                    frame[name] = value
                    with self.assertRaises(protocol.Refusal) as caught:
                        protocol.decode(json.dumps(frame))
                    self.assertIn(repr(name), caught.exception.message)


class HugeOffsetStoreMixin:
    """
    Item 6 in the store: the largest offset the protocol lets through is
    answered by both databases (SQLite overflowed past 2^63).
    """

    @defer.inlineCallbacks
    def test_largest_offset(self):
        """audit_entries with offset 2^53-1 is an empty page, not an OverflowError."""
        store = self.make_store()
        yield store.open()
        self.addCleanup(store.close)
        now = _RealClock.now_ms()
        yield store.create_mesh(MeshRecord("m-o", "o", "o", "k", now),
                                MemberRecord("u-o", "m-o", "k", "o", "owner", now))
        yield store.append_audit([AuditEvent("m-o", "x", None, {}, now)])
        entries, total = yield store.audit_entries("m-o", 500, protocol.MAX_SAFE_INTEGER)
        self.assertEqual((entries, total), ([], 1))


class HugeOffsetSQLiteTests(OnSQLite, HugeOffsetStoreMixin, unittest.TestCase):
    pass


class HugeOffsetPostgresTests(OnPostgres, HugeOffsetStoreMixin, unittest.TestCase):
    pass


# -- item 7: capacity before authentication -----------------------------------------------


class CapacityAfterAuthenticationTests(WireTestCase):
    """
    Item 7: a full mesh answers outsiders and bad credentials as such, not
    with capacity, which only a member that proved itself learns.
    """

    settings = {"max_connections_per_mesh": 1}

    def setUp(self):
        WireTestCase.setUp(self)
        self.hello(self.owner)

    def refused(self, hello, code):
        wire = self.wire()
        wire.send(hello)
        self.assertEqual([f.get("code") for f in wire.frames], [code])
        self.assertEqual(wire.client.close_info, (True, 1008, code))

    def test_outsider_unauthorized(self):
        """An outsider's hello to a full mesh is unauthorized, not capacity."""
        self.alice.identity = crypto.Identity.generate()
        self.refused(self.alice.hello_dict(), "unauthorized")

    def test_bad_signature_before_capacity(self):
        """A member's hello with a bad signature to a full mesh is bad_signature."""
        self.refused(self.alice.hello_dict(signature="c" * 128), "bad_signature")

    def test_member_gets_capacity(self):
        """A member that proved itself learns the mesh is full."""
        self.refused(self.alice.hello_dict(), "capacity")


# -- item 11: hook session id squatting ----------------------------------------------------


class HookSquattingTests(WireTestCase):
    """
    Item 11: a hook's session id is matched against the caller's own
    sessions only; another member claiming that id in its hello changes
    nothing for the caller.
    """

    def setUp(self):
        WireTestCase.setUp(self)
        from claudemesh.broker.hookroute import HookStatusResource
        from tests.test_hook import HookTestCase

        self.resource = HookStatusResource(self.fx.broker.hooks, self.fx.broker.metrics, 4096)
        self.post = lambda body, peer: HookTestCase.post(self, body, peer=peer)
        # Alice squats bob's Claude session id.
        self.hello(self.alice, claudeSessionId="cs-bob")

    def bob_session(self):
        [session] = self.fx.broker.meshes.cached(self.bob.mesh.id).sessions_of(self.bob.member.id)
        return session

    def test_hook_before_bobs_session(self):
        """Bob's hook for his Claude session is pending (not 403), applied when it says hello."""
        code, reply = self.post({"status": "working", "cwd": "", "pid": 0,
                                 "session_id": "cs-bob"}, self.bob)
        self.assertEqual((code, reply), (200, {"ok": True, "pending": True}))
        self.hello(self.bob, claudeSessionId="cs-bob")
        self.assertEqual(self.bob_session().status.status, "working")
        [alice] = self.fx.broker.meshes.cached(self.alice.mesh.id).sessions_of(
            self.alice.member.id)
        self.assertEqual(alice.status.status, "idle")

    def test_hook_matches_bobs_session_by_cwd(self):
        """Bob's hook naming a squatted id still finds bob's own session by its cwd."""
        self.hello(self.bob, session_id="b1")
        cwd = self.bob_session().cwd
        code, reply = self.post({"status": "working", "cwd": cwd, "pid": 0,
                                 "session_id": "cs-bob"}, self.bob)
        self.assertEqual((code, reply["status"]), (200, "working"))
        self.assertEqual(self.bob_session().status.status, "working")


# -- item 13: invites of a demoted admin; the hello's domain tag ----------------------------


class DemotedAdminInviteTests(WireTestCase):
    """
    Item 13: an invite dies with its creator's right to make it; promoting
    the creator again does not bring it back.
    """

    def setUp(self):
        WireTestCase.setUp(self)
        from tests.test_replay import JoinReplayTests

        self.owner_wire = self.hello(self.owner, session_id="owner")
        self.token = lambda reply, signer: JoinReplayTests.token(self, reply, signer=signer)
        self.join_frame = lambda token, invite_id: JoinReplayTests.join_frame(
            self, token, invite_id)

    def set_role(self, target, role):
        self.owner_wire.send({"type": "set_role", "target": target, "role": role})
        self.assertEqual(self.owner_wire.last()["type"], "set_role_ack", self.owner_wire.last())

    def invite_by(self, wire, role="member"):
        wire.send({"type": "create_invite", "role": role, "maxUses": 5})
        reply = wire.last()
        self.assertEqual(reply["type"], "invite_created", reply)
        return reply

    def join_with(self, reply, signer):
        wire = self.wire()
        wire.send(self.join_frame(self.token(reply, signer), reply["inviteId"]))
        return wire.last()

    def test_demoted_then_promoted(self):
        """An admin's invite stays dead after a demotion, even once the admin is promoted again."""
        self.set_role("alice", "admin")
        alice = self.hello(self.alice)
        reply = self.invite_by(alice)
        self.set_role("alice", "member")
        self.set_role("alice", "admin")
        answer = self.join_with(reply, self.alice.identity)
        self.assertEqual((answer["type"], answer.get("code")), ("error", "invite_revoked"))

    def test_banned_then_unbanned(self):
        """An admin's invite stays dead after a ban and an unban."""
        self.set_role("alice", "admin")
        alice = self.hello(self.alice)
        reply = self.invite_by(alice)
        self.owner_wire.send({"type": "ban", "target": "alice"})
        self.owner_wire.send({"type": "unban", "target": "alice"})
        self.assertEqual(self.owner_wire.last()["type"], "unban_ack")
        answer = self.join_with(reply, self.alice.identity)
        self.assertEqual((answer["type"], answer.get("code")), ("error", "invite_revoked"))

    def test_former_owner_keeps_member_invites_only(self):
        """After handing ownership over, the former owner's admin invites die, member ones live."""
        admin_invite = self.invite_by(self.owner_wire, role="admin")
        member_invite = self.invite_by(self.owner_wire)
        self.set_role("bob", "owner")
        answer = self.join_with(admin_invite, self.owner.identity)
        self.assertEqual((answer["type"], answer.get("code")), ("error", "invite_revoked"))
        answer = self.join_with(member_invite, self.owner.identity)
        self.assertEqual((answer["type"], answer["role"]), ("join_ack", "member"))


class HelloDomainTagTests(WireTestCase):
    """
    Item 13: the hello may be signed with the domain tag
    C{claudemesh-hello/1}; the untagged form of the original clients stays
    valid, and no other tagged string parses as one.
    """

    def test_tagged_hello(self):
        """A hello signed as claudemesh-hello/1|meshId|memberId|pubkey|ts|sessionId is accepted."""
        now = self.fx.now_ms()
        signed = "|".join(["claudemesh-hello/1", self.alice.mesh.id, self.alice.member.id,
                           self.alice.pubkey, str(now), "a|b"]).encode()
        self.hello(self.alice, timestamp=now, session_id="a|b",
                   signature=self.alice.identity.sign(signed))

    def test_tagged_hello_binds_the_session_id(self):
        """A tagged hello with its sessionId changed is bad_signature."""
        hello = self.alice.hello_dict(session_id="mine")
        hello["sessionId"] = "another"
        wire = self.wire()
        wire.send(hello)
        self.assertEqual(wire.frames[0]["code"], "bad_signature")

    def test_untagged_hello(self):
        """The original clients' untagged hello is still accepted."""
        now = self.fx.now_ms()
        signature = self.alice.identity.sign("|".join([
            self.alice.mesh.id, self.alice.member.id, self.alice.pubkey, str(now)]).encode())
        self.hello(self.alice, timestamp=now, signature=signature)

    def test_create_mesh_signature_is_no_hello(self):
        """A create-mesh signature read as an untagged hello is malformed (meshId not an id)."""
        now = self.fx.now_ms()
        owner = self.owner
        signature = owner.identity.sign(crypto.create_mesh_string("team", owner.pubkey, now))
        wire = self.wire()
        wire.send({"type": "hello", "meshId": crypto.CREATE_TAG, "memberId": "team",
                   "pubkey": owner.pubkey, "timestamp": now, "signature": signature,
                   "sessionId": "s"})
        self.assertEqual(wire.frames[0]["code"], "malformed")
        self.assertIn("'meshId'", wire.frames[0]["message"])


# -- item 12: replays within the skew window -----------------------------------------------


class ReplayWithinWindowTests(WireTestCase):
    """
    Item 12: a signed credential is good once; sent again within the 60 s
    window it is refused C{replayed}, and its victim is untouched.
    """

    def test_hello_replayed(self):
        """The same hello again within 60 s is error replayed, close 1008; the victim stays open."""
        hello = self.alice.hello_dict(session_id="victim")
        victim = self.wire()
        victim.send(hello)
        self.assertEqual(victim.frames[0]["type"], "hello_ack")
        self.fx.advance(30)
        attacker = self.wire()
        before = self.snapshot()
        attacker.send(dict(hello, _reqId="r"))
        self.assertEqual([(f["type"], f.get("code")) for f in attacker.frames],
                         [("error", "replayed")])
        self.assertEqual(attacker.client.close_info, (True, 1008, "replayed"))
        self.assertOpen(victim)
        self.assertUnchanged(before)

    def test_hello_replayed_with_another_session_id(self):
        """An untagged hello replayed under a new sessionId is replayed too (the id is unsigned)."""
        now = self.fx.now_ms()
        signature = self.alice.identity.sign(crypto.hello_string(
            self.alice.mesh.id, self.alice.member.id, self.alice.pubkey, now))
        self.hello(self.alice, session_id="first", timestamp=now, signature=signature)
        wire = self.wire()
        wire.send(self.alice.hello_dict(session_id="second", timestamp=now, signature=signature))
        self.assertEqual(wire.frames[0]["code"], "replayed")

    def test_forgotten_after_the_window(self):
        """The memory holds a signature only while its timestamp could pass the skew check."""
        memory = self.fx.broker.replays
        hello = self.alice.hello_dict()
        self.hello(self.alice, **{k: hello[k] for k in ("timestamp", "signature")})
        self.assertEqual(len(memory), 1)
        self.fx.advance(61)
        result_of(memory.first_use("hello", "k", "s", self.fx.now_ms() + 1000))
        self.assertEqual(len(memory), 1)

    def test_join_replayed_after_leave(self):
        """A join proof used once cannot make the key a member again after it left."""
        from tests.test_replay import JoinReplayTests

        owner = self.hello(self.owner, session_id="owner")
        owner.send({"type": "create_invite", "maxUses": 5})
        reply = owner.last()
        token = JoinReplayTests.token(self, reply)
        identity = crypto.Identity.generate()
        frame = JoinReplayTests.join_frame(self, token, reply["inviteId"], identity=identity)
        wire = self.wire()
        wire.send(frame)
        joined = wire.last()
        self.assertEqual(joined["type"], "join_ack")
        wire.send(frame)
        self.assertEqual(wire.last()["type"], "join_ack", "a retry finds the membership")
        mesh = self.fx.broker.meshes.cached(self.owner.mesh.id)
        peer = Peer(self.fx, self.owner.mesh, mesh.members[joined["memberId"]], identity)
        member = self.hello(peer, session_id="new")
        member.send({"type": "leave"})
        self.assertEqual(member.last()["type"], "leave_ack")
        again = self.wire()
        again.send(frame)
        self.assertEqual((again.last()["type"], again.last()["code"]), ("error", "replayed"))


class HookReplayWithinWindowTests(WireTestCase):
    """
    Item 12 for the hook: the same signed POST twice is 200 then 401.
    """

    def test_hook_replayed(self):
        """An identical signed hook request sent twice is applied once, then 401 replayed."""
        from claudemesh.broker.hookroute import HookStatusResource
        from tests.test_hook import HookTestCase

        self.resource = HookStatusResource(self.fx.broker.hooks, self.fx.broker.metrics, 4096)
        self.hello(self.alice, session_id="a1")
        body = json.dumps({"status": "working", "session_id": "a1"}).encode()
        now = self.fx.now_ms()
        signature = self.alice.identity.sign(crypto.hook_string(self.alice.mesh.id, now, body))
        first = HookTestCase.post(self, body, peer=self.alice, timestamp=now,
                                  signature=signature)
        self.assertEqual((first[0], first[1]["status"]), (200, "working"))
        self.fx.advance(5)
        second = HookTestCase.post(self, body, peer=self.alice, timestamp=now,
                                   signature=signature)
        self.assertEqual((second[0], second[1]["error"]), (401, "replayed"))


class CreateMeshReplayTests(WireTestCase):
    """
    Item 12 for C{POST /meshes}: the same signed creation twice makes one mesh.
    """

    def test_create_replayed(self):
        """A replayed create_mesh body is refused replayed; one mesh exists."""
        identity = crypto.Identity.generate()
        now = self.fx.now_ms()
        body = {"name": "twice", "ownerPubkey": identity.pubkey, "displayName": "o",
                "timestamp": now,
                "signature": identity.sign(crypto.create_mesh_string("twice", identity.pubkey,
                                                                     now))}
        membership = self.fx.broker.membership
        created = result_of(membership.create_mesh(body))
        self.assertEqual(created["name"], "twice")
        d = membership.create_mesh(dict(body))
        self.fx.flush()
        failure = self.failureResultOf(d)
        self.assertEqual(failure.value.code, "replayed")


# -- items 8-10: slow, oversized and vanished HTTP clients, over real sockets -------------


class RawClient(Protocol):
    """
    A TCP client that writes what it is told and records what it gets;
    C{lost} fires when the connection is gone.
    """

    def __init__(self, first=b""):
        self.first = first
        self.received = b""
        self.lost = defer.Deferred()
        self.answered = defer.Deferred()

    def connectionMade(self):
        if self.first:
            self.transport.write(self.first)

    def dataReceived(self, data):
        self.received += data
        if not self.answered.called and b"\r\n\r\n" in self.received:
            self.answered.callback(self.received.split(b" ", 2)[1])

    def connectionLost(self, reason):
        if not self.answered.called:
            self.answered.callback(None)
        self.lost.callback(None)


class SocketBrokerMixin:
    """
    A broker on SQLite listening on 127.0.0.1, its admission deadlines on a
    fake clock (so no test waits for real seconds), and raw TCP clients.
    """

    timeout = 30
    settings = {}

    @defer.inlineCallbacks
    def setUp(self):
        from tests.clientfixture import InProcessBroker

        directory = self.mktemp()
        os.makedirs(directory)
        self.broker = InProcessBroker(reactor, directory, make_store=self.make_store(directory),
                                      **self.settings)
        yield self.broker.start()
        self.addCleanup(self.broker.stop)
        self.deadlines = task.Clock()
        self.broker.site.admission.clock = self.deadlines
        self.clients = []
        self.addCleanup(self.close_clients)

    def make_store(self, directory):
        return None

    @defer.inlineCallbacks
    def raw(self, first=b""):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.broker.port.getHost().port)
        client = yield connectProtocol(endpoint, RawClient(first))
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def close_clients(self):
        for client in self.clients:
            if not client.lost.called:
                client.transport.abortConnection()
            yield client.lost

    def within(self, d, seconds=5):
        return d.addTimeout(seconds, reactor)

    @defer.inlineCallbacks
    def settle(self):
        # Let the server side read what was sent (real sockets).
        for _ in range(5):
            yield task.deferLater(reactor, 0.01, lambda: None)


def upgrade_head(complete=True):
    lines = [b"GET /ws HTTP/1.1", b"Host: 127.0.0.1", b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Version: 13"]
    return b"\r\n".join(lines) + (b"\r\n\r\n" if complete else b"\r\n")


class SlowlorisTests(SocketBrokerMixin, unittest.TestCase):
    """
    Item 8: half-finished requests hold nothing for long, and every
    connection counts toward its address's cap from accept.
    """

    settings = {"header_timeout_seconds": 10, "max_connections_per_ip": 5}

    @defer.inlineCallbacks
    def test_header_deadline(self):
        """Upgrades that send a header line now and then are answered 408 and closed at 10 s."""
        clients = []
        for _ in range(4):
            clients.append((yield self.raw(upgrade_head(complete=False))))
        yield self.settle()
        for second in range(9):
            for client in clients:
                client.transport.write(b"X-Slow-%d: 1\r\n" % (second,))
            yield self.settle()
            self.deadlines.advance(1)
        self.assertEqual([c.lost.called for c in clients], [False] * 4)
        self.deadlines.advance(1)
        statuses = yield self.within(defer.gatherResults([c.answered for c in clients]))
        self.assertEqual(statuses, [b"408"] * 4)
        yield self.within(defer.gatherResults([c.lost for c in clients]))
        self.assertEqual(self.broker.factory.limits.open_connections("127.0.0.1"), 0)

    @defer.inlineCallbacks
    def test_idle_connections_closed_silently(self):
        """A connection that sends nothing, or idles after an answer, is closed without a 408."""
        silent = yield self.raw()
        kept = yield self.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((yield self.within(kept.answered)), b"200")
        yield self.settle()
        self.deadlines.advance(10)
        yield self.within(defer.gatherResults([silent.lost, kept.lost]))
        self.assertEqual(silent.received, b"")
        self.assertNotIn(b"408", kept.received)

    @defer.inlineCallbacks
    def test_cap_counts_from_accept(self):
        """Five silent connections fill the address's cap: the sixth is answered 429 and closed."""
        for _ in range(5):
            yield self.raw()
        yield self.settle()
        sixth = yield self.raw(upgrade_head())
        status = yield self.within(sixth.answered)
        self.assertEqual(status, b"429")
        self.assertIn(b"too_many_connections", sixth.received)
        yield self.within(sixth.lost)
        self.clients[0].transport.loseConnection()
        yield self.clients[0].lost
        yield self.settle()
        seventh = yield self.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((yield self.within(seventh.answered)), b"200")

    @defer.inlineCallbacks
    def test_websocket_keeps_its_count(self):
        """An upgraded connection is counted once, and released when it closes."""
        limits = self.broker.factory.limits
        client = yield self.raw(upgrade_head()[:-2] + b"Sec-WebSocket-Key: "
                                + base64.b64encode(b"k" * 16) + b"\r\n\r\n")
        self.assertEqual((yield self.within(client.answered)), b"101")
        self.assertEqual(limits.open_connections("127.0.0.1"), 1)
        client.transport.loseConnection()
        yield client.lost
        yield self.settle()
        self.assertEqual(limits.open_connections("127.0.0.1"), 0)


class HelloDeadlineTests(WireTestCase):
    """
    Item 8: a WebSocket that never says a successful hello is closed.
    """

    def test_no_hello_closed_after_10s(self):
        """A WebSocket silent for 10 s after opening gets error hello_timeout and close 1008."""
        wire = self.wire()
        self.fx.advance(9)
        wire.pump()
        self.assertOpen(wire)
        self.fx.advance(1)
        wire.pump()
        self.assertEqual([(f["type"], f.get("code")) for f in wire.frames],
                         [("error", "hello_timeout")])
        self.assertEqual(wire.client.close_info, (True, 1008, "hello_timeout"))

    def test_failed_hellos_do_not_extend_it(self):
        """Bad frames and refused hellos before the deadline do not move it."""
        wire = self.wire()
        for _ in range(5):
            wire.send({"type": "list_peers"})
            self.fx.advance(2)
        wire.pump()
        self.assertEqual(wire.client.close_info, (True, 1008, "hello_timeout"))

    def test_hello_in_time_stays(self):
        """A session that said hello in time is not closed by the deadline."""
        wire = self.hello(self.alice)
        self.fx.advance(30)
        wire.pump()
        self.assertOpen(wire)


class DeclaredLengthTests(SocketBrokerMixin, unittest.TestCase):
    """
    Item 9: a body over the limit is refused on its declared length, at
    once, and a body without one as soon as it passes the limit.
    """

    settings = {"max_message_bytes": 4096}

    @defer.inlineCallbacks
    def refused_at_once(self, path):
        client = yield self.raw(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                b"\r\nContent-Length: 10000000000\r\n\r\n{\"a\":" % (path,))
        status = yield self.within(client.answered)
        self.assertEqual(status, b"413")
        self.assertIn(b"payload too large", client.received)
        yield self.within(client.lost)

    def test_hook(self):
        """POST /hook/set-status with Content-Length 10^10 is 413 before any body is sent."""
        return self.refused_at_once(b"/hook/set-status")

    def test_join(self):
        """POST /join with Content-Length 10^10 is 413 before any body is sent."""
        return self.refused_at_once(b"/join")

    @defer.inlineCallbacks
    def test_chunked_body_capped(self):
        """A chunked body is answered 413 once it passes the limit, without waiting for its end."""
        client = yield self.raw(b"POST /join HTTP/1.1\r\nHost: x\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            client.transport.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        status = yield self.within(client.answered)
        self.assertEqual(status, b"413")
        yield self.within(client.lost)

    @defer.inlineCallbacks
    def test_within_the_limit_answered(self):
        """A body within the limit is still read and answered by its route."""
        body = b'{"not": "a join"}'
        client = yield self.raw(b"POST /join HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
        self.assertEqual((yield self.within(client.answered)), b"400")


class GatedStore:
    """
    A store whose C{get_mesh} and C{get_invite} answer only once C{gate}
    fired: an answer that comes after the client hung up.
    """

    def __init__(self, store):
        self._store = store
        self.gate = defer.Deferred()
        self.waiting = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _held(self, name, *args):
        self.waiting += 1
        d = defer.Deferred()
        self.gate.addCallback(lambda _: getattr(self._store, name)(*args).chainDeferred(d))
        return d

    def get_mesh(self, mesh_id):
        return self._held("get_mesh", mesh_id)

    def get_invite(self, invite_id):
        return self._held("get_invite", invite_id)


class HangUpTests(SocketBrokerMixin, unittest.TestCase):
    """
    Item 10: clients that hang up before the answer leave no error (and no
    traceback) in the log.
    """

    def make_store(self, directory):
        def make():
            self.gated = GatedStore(SQLiteStore(os.path.join(directory, "b.sqlite3"), reactor))
            return self.gated

        return make

    def join_body(self):
        identity = crypto.Identity.generate()
        token = encode_token(sign_invite(identity, "m" * 32, "team", "i" * 32, "member",
                                         2_000_000_000, "ws://x/ws"))
        now = _RealClock.now_ms()
        return json.dumps({"invite": token, "pubkey": identity.pubkey, "displayName": "x",
                           "timestamp": now, "signature": identity.sign(crypto.join_string(
                               "i" * 32, identity.pubkey, "x", now))}).encode()

    def hook_request(self):
        identity = crypto.Identity.generate()
        body = b'{"status": "working"}'
        now = _RealClock.now_ms()
        headers = (b"X-Claudemesh-Mesh: m1\r\nX-Claudemesh-Pubkey: %s\r\n"
                   b"X-Claudemesh-Timestamp: %d\r\nX-Claudemesh-Signature: %s\r\n"
                   % (identity.pubkey.encode(), now,
                      identity.sign(crypto.hook_string("m1", now, body)).encode()))
        return (b"POST /hook/set-status HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s"
                % (headers, len(body), body))

    @defer.inlineCallbacks
    def test_hang_ups_log_nothing(self):
        """Forty POSTs (join and hook) hanging up before their answer log no error."""
        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        body = self.join_body()
        clients = []
        for _ in range(20):
            clients.append((yield self.raw(
                b"POST /join HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body))))
            clients.append((yield self.raw(self.hook_request())))
        # Twenty invite look-ups, and one mesh load the twenty hooks share.
        while self.gated.waiting < 21:
            yield self.settle()
        for client in clients:
            client.transport.abortConnection()
        for client in clients:
            yield client.lost
        yield self.settle()
        self.gated.gate.callback(None)
        yield self.settle()
        yield self.broker.broker.writes.flushed()
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        bad = [e for e in logged if e.get("log_level") in (LogLevel.error, LogLevel.critical)
               or "log_failure" in e]
        self.assertEqual(bad, [])
