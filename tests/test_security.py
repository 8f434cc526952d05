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

import json

from twisted.internet import defer, reactor
from twisted.trial import unittest

from claudemesh import crypto, protocol
from claudemesh.broker.groupcommit import GroupCommit
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
                except protocol.FrameError as e:
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
                with self.assertRaises(protocol.FrameError) as caught:
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
        released = self.writes.release_leases("p-old")
        self.writes.close_session("p-old", self.now + 1)
        result = yield sent
        self.assertEqual(result.message_id, "m-second")
        yield released
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
