# -*- test-case-name: tests.test_fuzz -*-
"""
Hostile input (issue 8): hypothesis-generated frames of every type in
L{claudemesh.protocol.FRAME_TYPES} — valid ones mutated, wrong types, huge
numbers, odd unicode, nested junk, raw bytes — fed through the real
L{BrokerServerProtocol} over memory wires (before and after a hello, as an
owner and as a member), and generated requests for the HTTP routes
(C{/hook/set-status}, C{/meshes}, C{/join}).

What must hold for every example: nothing is logged as an error (no
unhandled exception), every frame the broker sends is a JSON object with a
known C{type} and no traceback in it, and a connection only closes with one
of the documented codes; an HTTP answer is always a JSON object with a 2xx
or 4xx status.

C{make test} runs a modest number of examples; C{make fuzz} (or
C{CLAUDEMESH_FUZZ_EXAMPLES=N}) many more.
"""

import io
import json
import os

import attr
import txaio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from claudemesh import crypto, protocol
from claudemesh.broker.hookroute import HookStatusResource
from claudemesh.broker.meshroutes import JoinResource, MeshCreationResource
from claudemesh.broker.ws import BrokerServerFactory
from claudemesh.invite import encode_token, sign_invite
from claudemesh.store.sql.operations import Query
from tests.meshfixture import BrokerFixture, WireConnection

EXAMPLES = int(os.environ.get("CLAUDEMESH_FUZZ_EXAMPLES", "0") or 0)
settings.register_profile(
    "claudemesh-fuzz",
    max_examples=EXAMPLES or 60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("claudemesh-fuzz")

MAX_BYTES = 8192

# What the broker may send (docs/protocol.md).
OUTBOUND_TYPES = {
    "hello_ack", "join_ack", "ack", "push", "error", "peers_list", "members_list",
    "message_status_result", "invite_created", "invites_list", "revoke_invite_ack",
    "set_role_ack", "leave_ack", "disconnect_ack", "kick_ack", "ban_ack", "unban_ack",
    "list_bans_result", "audit_result", "audit_verify_result",
    # Mesh key epochs (issue 17): any member's mesh_key_status is answered.
    "rotate_mesh_key_ack", "share_mesh_key_ack", "mesh_key", "mesh_key_status_result",
}
# Closes a fuzzed connection may see: (code, reason) or code alone.
ALLOWED_CLOSES = {
    (1008, "flood"), (1008, "bad_signature"), (1008, "bad_session_pubkey"),
    (1008, "timestamp_skew"), (1008, "malformed"), (1008, "unauthorized"),
    (1008, "capacity"), (4002, "banned"), (1000, "left"), (1000, "session_replaced"),
    (1008, "replayed"), (1008, "hello_timeout"), (1009, "message too big"),
}
ALLOWED_CLOSE_CODES = {1007, 1009}

# -- strategies ----------------------------------------------------------------------

ODD_TEXT = st.sampled_from([
    "", " ", "\x00", "\ud800", "a\udfff", "\u202e", "😀" * 40, "|", "a|b", "\n\t", "null",
    "../../etc/passwd", "%s%n", "@", "@@", "@a/b/c", "*", "@all", "x" * 300, "é",
    "0" * 64, "f" * 128, "\ufeff", "<script>",
])
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**31 - 1, 2**53 + 1, 2**63, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=40), ODD_TEXT)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)
# Placeholders replaced by real values of the example's mesh.
PLACEHOLDERS = ["@ALICE", "@BOB", "@OWNER", "@ALICE_NAME", "@MESH", "@ALICE_ID", "@MESSAGE",
                "@NOW", "@INVITE", "@INVITE_ID"]
PLAUSIBLE = st.one_of(st.sampled_from(PLACEHOLDERS), st.sampled_from(protocol.STATUSES),
                      st.sampled_from(protocol.PRIORITIES), st.sampled_from(protocol.ROLES),
                      st.sampled_from(["*", "@all", "@team", "team/a", "bm9uY2U=", "eA=="]))
VALUE = st.one_of(PLAUSIBLE, JSON_VALUES)
FRAME_TYPE = st.one_of(st.sampled_from(sorted(protocol.FRAME_TYPES)),
                       st.sampled_from(["", "HELLO", "push", "ack", "hello_ack", "__proto__"]),
                       JSON_VALUES)


@st.composite
def frames(draw):
    """
    A frame dict: a type (usually a real one), some of its fields with
    plausible or junk values, maybe extra fields.
    """
    type_name = draw(FRAME_TYPE)
    frame = {"type": type_name}
    cls = protocol.FRAME_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is not None:
        for attribute in attr.fields(cls):
            if draw(st.integers(0, 4)):
                frame[attribute.name] = draw(VALUE)
    for key in draw(st.lists(st.text(max_size=10), max_size=2)):
        frame[key] = draw(VALUE)
    if draw(st.integers(0, 9)) == 0:
        frame.pop("type", None)
    return frame


@st.composite
def valid_then_mutated(draw):
    """
    A frame that would be valid (a signed hello, a DM, a request), with a
    few fields replaced, removed or added.
    """
    kind = draw(st.sampled_from(["hello", "hello_session", "send", "join", "client_ack",
                                 "set_status", "create_invite", "kick", "ban", "audit_query",
                                 "message_status", "list_peers", "leave"]))
    frame = {"template": kind}
    keys = st.text(max_size=16) | st.sampled_from(
        ["meshId", "memberId", "pubkey", "signature", "timestamp", "sessionPubkey",
         "targetSpec", "nonce", "ciphertext", "priority", "id", "_reqId", "type",
         "messageId", "status", "invite", "displayName", "groups", "target"])
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop", "add"]))
        frame.setdefault("mutations", []).append((action, draw(keys), draw(VALUE)))
    return frame


def junk_payloads():
    return st.one_of(
        st.binary(max_size=300),
        st.sampled_from([b"[" * 5000, b"{" * 3000, b'{"type":"send"' + b"," * 1000,
                         b"1e999999", b'{"type":"hello","timestamp":1e400}', b"\xff\xfe",
                         b'{"type":"list_peers","_reqId":"\\ud800"}', b'"\\u0000"', b"null",
                         b'{"a":' * 2000, b"[]" * 100]),
    )


# What issue 11 found: NUL in text that reached Postgres, and integers past
# what SQLite binds. Each is put into every field of a valid frame in turn.
HUGE_INTEGERS = st.sampled_from([2**53, -(2**53), 2**63, -(2**63) - 1, 2**64, 10**30,
                                 -(10**30), 10**4000])
TEMPLATES = ["hello", "hello_session", "send", "join", "client_ack", "set_status",
             "create_invite", "kick", "ban", "audit_query", "message_status", "list_peers",
             "leave", "join_group", "set_summary", "list_members", "list_invites",
             "revoke_invite", "set_role", "disconnect", "unban", "list_bans", "leave_group"]


@st.composite
def poisoned(draw):
    """
    A valid frame with one field (a top-level one, or a string inside it)
    given a NUL byte or a huge integer.
    """
    kind = draw(st.sampled_from(TEMPLATES))
    return {"template": kind, "poison": (draw(st.integers(0, 30)),
                                         draw(st.sampled_from(["nul", "integer"])),
                                         draw(st.integers(0, 100)), draw(HUGE_INTEGERS))}


PAYLOADS = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), frames(), st.booleans(), st.booleans()),
        st.tuples(st.just("template"), valid_then_mutated(), st.booleans(), st.booleans()),
        st.tuples(st.just("template"), poisoned(), st.booleans(), st.booleans()),
        st.tuples(st.just("raw"), junk_payloads(), st.booleans(), st.booleans()),
    ),
    min_size=1, max_size=6,
)


def poison(frame, spec):
    """
    Apply a L{poisoned} spec to C{frame}: pick its field number C{index}
    (modulo the fields there are), and insert a NUL into its text (at
    C{where}) or replace it by C{number}.
    """
    index, how, where, number = spec
    names = sorted(k for k in frame if k != "type")
    if not names:
        return frame
    name = names[index % len(names)]
    value = frame[name]
    if how == "integer":
        frame[name] = number
    elif isinstance(value, str):
        cut = where % (len(value) + 1)
        frame[name] = value[:cut] + "\x00" + value[cut:]
    elif isinstance(value, list) and value:
        frame[name] = [("\x00" + v) if isinstance(v, str) else v for v in value]
    else:
        frame[name] = "\x00"
    return frame


# -- the world of one example ----------------------------------------------------------


class World:
    """
    A fresh broker with a mesh (owner, alice, bob), one message from bob to
    alice, and one open invite.
    """

    def __init__(self, case):
        self.fx = BrokerFixture(max_message_bytes=MAX_BYTES, send_rate_limit_per_min=0,
                                send_rate_limit_burst=0, hello_rate_per_ip=0)
        txaio.tx.config.loop = self.fx.clock
        self.factory = BrokerServerFactory(self.fx.broker, self.fx.clock, self.fx.settings)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")
        self.bob.connect(session_id="bobs")
        self.message_id = self.bob.send(self.alice.pubkey)["messageId"]
        self.owner.connect(session_id="owner-core")
        reply = self.owner.request({"type": "create_invite", "maxUses": 3})
        self.invite_id = reply["inviteId"]
        self.invite = encode_token(sign_invite(
            self.owner.identity, self.owner.mesh.id, "team", self.invite_id, "member",
            reply["expiresAt"], "ws://127.0.0.1:7777/ws"))
        self.values = {
            "@ALICE": self.alice.pubkey, "@BOB": self.bob.pubkey, "@OWNER": self.owner.pubkey,
            "@ALICE_NAME": "alice", "@MESH": self.owner.mesh.id,
            "@ALICE_ID": self.alice.member.id, "@MESSAGE": self.message_id,
            "@NOW": self.fx.now_ms(), "@INVITE": self.invite, "@INVITE_ID": self.invite_id,
        }

    def substitute(self, value):
        if isinstance(value, str):
            return self.values.get(value, value)
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value

    def template(self, spec):
        kind = spec["template"]
        alice = self.alice
        if kind == "hello":
            frame = alice.hello_dict(session_id="fz")
        elif kind == "hello_session":
            frame = alice.hello_dict(session_id="fz", session_key=True)
        elif kind == "send":
            nonce, ciphertext = crypto.encrypt_direct(alice.identity, self.bob.pubkey, b"fz")
            frame = {"type": "send", "targetSpec": self.bob.pubkey, "nonce": nonce,
                     "ciphertext": ciphertext, "id": "fz1"}
        elif kind == "join":
            identity = crypto.Identity.generate()
            now = self.fx.now_ms()
            frame = {"type": "join", "invite": self.invite, "pubkey": identity.pubkey,
                     "displayName": "fz", "timestamp": now,
                     "signature": identity.sign(crypto.join_string(
                         self.invite_id, identity.pubkey, "fz", now))}
        elif kind == "client_ack":
            frame = {"type": "client_ack", "messageId": self.message_id}
        elif kind == "set_status":
            frame = {"type": "set_status", "status": "working", "sessionId": "bobs"}
        elif kind == "create_invite":
            frame = {"type": "create_invite", "role": "admin", "maxUses": 2}
        elif kind in ("kick", "ban"):
            frame = {"type": kind, "target": "bob"}
        elif kind == "audit_query":
            frame = {"type": "audit_query", "limit": 5}
        elif kind == "message_status":
            frame = {"type": "message_status", "messageId": self.message_id}
        elif kind in ("join_group", "leave_group"):
            frame = {"type": kind, "name": "team/a", "role": "lead"}
        elif kind == "set_summary":
            frame = {"type": kind, "summary": "fz", "sessionId": "bobs"}
        elif kind == "revoke_invite":
            frame = {"type": kind, "inviteId": self.invite_id}
        elif kind == "set_role":
            frame = {"type": kind, "target": "bob", "role": "admin"}
        elif kind in ("disconnect", "unban"):
            frame = {"type": kind, "target": "bob"}
        elif kind in ("list_members", "list_invites", "list_bans", "list_peers"):
            frame = {"type": kind, "cursor": "[1,1]"}
        else:
            frame = {"type": kind}
        frame["_reqId"] = "fz"
        if "poison" in spec:
            frame = poison(frame, spec["poison"])
        for action, key, value in spec.get("mutations", ()):
            if action == "drop":
                frame.pop(key, None)
            else:
                frame[key] = self.substitute(value)
        return frame

    def payload(self, item):
        kind, value, ascii_only, binary = item
        if kind == "raw":
            return value, binary
        frame = self.template(value) if kind == "template" else self.substitute(value)
        try:
            text = json.dumps(frame, ensure_ascii=ascii_only, allow_nan=True)
        except (ValueError, OverflowError):
            text = repr(frame)
        return text.encode("utf-8", "surrogatepass"), False


class FrameFuzzTests(unittest.TestCase):
    def setUp(self):
        self.patch(txaio.tx.config, "loop", txaio.tx.config.loop)

    def check_frames(self, wire):
        for frame in wire.frames:
            self.assertIsInstance(frame, dict)
            self.assertIn(frame.get("type"), OUTBOUND_TYPES, frame)
            if frame["type"] == "error":
                self.assertIsInstance(frame.get("code"), str, frame)
                self.assertIsInstance(frame.get("message"), str, frame)
                self.assertNotEqual(frame["code"], "internal", frame)
                self.assertNotIn("Traceback", frame["message"])
                self.assertNotIn("File \"", frame["message"])

    def check_close(self, wire):
        info = wire.client.close_info
        if info is None:
            return
        _, code, reason = info
        self.assertTrue((code, reason) in ALLOWED_CLOSES or code in ALLOWED_CLOSE_CODES,
                        "unexpected close %r after %r" % (info, wire.frames[-3:]))

    @FUZZ
    @given(role=st.sampled_from(["none", "alice", "owner"]), payloads=PAYLOADS)
    def test_frames(self, role, payloads):
        """Fuzzed frames never raise, every reply is a known frame, closes are documented."""
        world = World(self)
        wire = WireConnection(world.fx, world.factory)
        if role != "none":
            peer = world.alice if role == "alice" else world.owner
            wire.send(peer.hello_dict(session_id="fuzzer"))
            self.assertEqual(wire.frames[0]["type"], "hello_ack")
        for item in payloads:
            if wire.client.close_info is not None:
                break
            data, binary = world.payload(item)
            wire.client.sendMessage(data, isBinary=binary)
            wire.pump()
        world.fx.advance(3)
        wire.pump()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.check_frames(wire)
        self.check_close(wire)
        self.assertEqual(stored_nul(world.fx.store), [])


def stored_nul(store):
    """
    The (table, column) of every stored text holding a NUL: none may, as
    Postgres cannot store one (issue 11), so the protocol must refuse them
    before they reach any store.
    """
    from tests.meshfixture import result_of

    tables = ("meshes", "members", "invites", "sessions", "messages", "deliveries",
              "send_keys", "audit_log", "session_keys")

    def scan():
        found = []
        for table in tables:
            rows = yield Query("SELECT * FROM %s" % (table,))
            for row in rows:
                for index, value in enumerate(row):
                    if isinstance(value, str) and "\x00" in value:
                        found.append((table, index))
        return found

    return result_of(store.run_interaction("scan_for_nul", scan, write=False))


# -- HTTP routes ------------------------------------------------------------------------

HEADER_VALUES = st.one_of(st.sampled_from(PLACEHOLDERS), st.text(max_size=80),
                          st.binary(max_size=40), st.sampled_from(["", "0", "-1", "1e9",
                                                                   "9" * 40]))
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES,
    st.fixed_dictionaries({}, optional={
        "status": VALUE, "cwd": VALUE, "pid": VALUE, "session_id": VALUE,
        "name": VALUE, "ownerPubkey": VALUE, "displayName": VALUE, "timestamp": VALUE,
        "signature": VALUE, "invite": VALUE, "pubkey": VALUE}),
)


class RouteFuzzTests(unittest.TestCase):
    def render(self, world, resource, body, headers, length=None):
        if not isinstance(body, bytes):
            try:
                body = json.dumps(world.substitute(body), allow_nan=True).encode(
                    "utf-8", "surrogatepass")
            except (ValueError, OverflowError):
                body = repr(body).encode("utf-8", "surrogatepass")
        request = DummyRequest([b""])
        request.method = b"POST"
        request.content = io.BytesIO(body)
        request.requestHeaders.setRawHeaders(
            b"content-length", [length if length is not None else str(len(body)).encode()])
        for name, value in headers.items():
            value = world.substitute(value)
            if not isinstance(value, bytes):
                value = str(value).encode("utf-8", "surrogatepass")
            request.requestHeaders.setRawHeaders(name, [value.replace(b"\r", b"").replace(
                b"\n", b"")])
        result = resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        world.fx.flush()
        self.assertTrue(request.finished)
        code = request.responseCode or 200
        self.assertTrue(200 <= code < 500, (code, request.written))
        answer = json.loads(b"".join(request.written))
        self.assertIsInstance(answer, dict)
        return code, answer

    @FUZZ
    @given(route=st.sampled_from(["hook", "meshes", "meshes-token", "join"]), body=BODIES,
           headers=st.dictionaries(
               st.sampled_from([b"x-claudemesh-mesh", b"x-claudemesh-pubkey",
                                b"x-claudemesh-timestamp", b"x-claudemesh-signature",
                                b"authorization", b"x-forwarded-for", b"forwarded"]),
               HEADER_VALUES, max_size=5),
           length=st.one_of(st.none(), st.sampled_from([b"0", b"-1", b"abc", b"99999999"])))
    def test_routes(self, route, body, headers, length):
        """Fuzzed POSTs to the HTTP routes always get a JSON object and a 2xx/4xx status."""
        world = World(self)
        broker = world.fx.broker
        membership = broker.membership
        resource = {
            "hook": lambda: HookStatusResource(broker.hooks, broker.metrics, MAX_BYTES),
            "meshes": lambda: MeshCreationResource(membership, None, MAX_BYTES),
            "meshes-token": lambda: MeshCreationResource(membership, "tok", MAX_BYTES),
            "join": lambda: JoinResource(membership, MAX_BYTES),
        }[route]()
        self.render(world, resource, body, headers, length)
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(status=VALUE, session_id=VALUE, cwd=VALUE, pid=VALUE)
    def test_signed_hook_bodies(self, status, session_id, cwd, pid):
        """Correctly signed hook requests with fuzzed bodies: JSON answers, 2xx/4xx, no error."""
        world = World(self)
        resource = HookStatusResource(world.fx.broker.hooks, world.fx.broker.metrics, MAX_BYTES)
        body = {"status": status, "session_id": session_id, "cwd": cwd, "pid": pid}
        try:
            raw = json.dumps(world.substitute(body), allow_nan=True).encode(
                "utf-8", "surrogatepass")
        except (ValueError, OverflowError):
            raw = b"{}"
        now = world.fx.now_ms()
        headers = {
            b"x-claudemesh-mesh": world.owner.mesh.id,
            b"x-claudemesh-pubkey": world.alice.pubkey,
            b"x-claudemesh-timestamp": str(now),
            b"x-claudemesh-signature": world.alice.identity.sign(
                crypto.hook_string(world.owner.mesh.id, now, raw)),
        }
        self.render(world, resource, raw, headers)
        self.assertEqual(self.flushLoggedErrors(), [])


class FoundByFuzzingTests(unittest.TestCase):
    """
    What the fuzzer found, kept as plain regression tests.
    """

    def setUp(self):
        self.patch(txaio.tx.config, "loop", txaio.tx.config.loop)
        self.world = World(self)
        self.wire = WireConnection(self.world.fx, self.world.factory)

    def test_join_after_hello(self):
        """A join frame after hello is error invalid (it was an internal error)."""
        self.wire.send(self.world.alice.hello_dict(session_id="fz"))
        self.wire.send(self.world.template({"template": "join"}))
        self.assertEqual((self.wire.last()["code"], self.wire.last()["_reqId"]), ("invalid", "fz"))
        self.assertIsNone(self.wire.client.close_info)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unpaired_surrogate_req_id(self):
        """An unpaired surrogate escape in _reqId is malformed, not echoed, connection open."""
        self.wire.send_raw(b'{"type":"list_peers","_reqId":"\\ud800"}')
        self.assertEqual(self.wire.last(), {
            "type": "error", "code": "malformed",
            "message": "frame holds an unpaired UTF-16 surrogate escape"})
        # Checked before the type: whatever the frame, nothing of it is echoed.
        self.wire.send_raw(b'{"type":"nope","_reqId":"\\udfff"}')
        self.assertEqual(self.wire.last(), {
            "type": "error", "code": "malformed",
            "message": "frame holds an unpaired UTF-16 surrogate escape"})
        self.wire.send(self.world.alice.hello_dict(session_id="fz"))
        self.wire.send_raw(b'{"type":"list_peers","_reqId":"\\ud800"}')
        self.assertEqual(self.wire.last()["code"], "malformed")
        self.assertIsNone(self.wire.client.close_info)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unpaired_surrogate_in_send(self):
        """A send whose ciphertext holds an unpaired surrogate is malformed and stores nothing."""
        from tests.meshfixture import result_of

        self.wire.send(self.world.alice.hello_dict(session_id="fz"))
        queued = result_of(self.world.fx.store.count_queued())
        self.wire.send_raw(json.dumps({"type": "send", "targetSpec": self.world.bob.pubkey,
                                       "nonce": "bm9uY2U=", "ciphertext": "\ud800"}).encode())
        self.assertEqual(self.wire.last()["code"], "malformed")
        self.assertEqual(result_of(self.world.fx.store.count_queued()), queued)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_surrogate_pair_is_fine(self):
        """A surrogate pair escape (an emoji from an ASCII-only encoder) is accepted."""
        self.wire.send(self.world.alice.hello_dict(session_id="fz"))
        self.wire.send_raw(b'{"type":"set_summary","summary":"\\ud83d\\ude00"}')
        self.assertNotEqual(self.wire.last()["type"], "error")
        [session] = [s for s in self.world.fx.broker.meshes.cached(
            self.world.owner.mesh.id).sessions.values() if s.session_id == "fz"]
        self.assertEqual(session.summary, "\U0001f600")

    def test_join_with_unpaired_surrogate_name(self):
        """POST /join with an unencodable display name is 400 malformed (it would poison a mesh)."""
        from tests.meshfixture import store_snapshot

        world = self.world
        frame = world.template({"template": "join"})
        del frame["type"], frame["_reqId"]
        frame["displayName"] = "\ud800"
        before = store_snapshot(world.fx.store)
        code, answer = RouteFuzzTests.render(
            self, world, JoinResource(world.fx.broker.membership, MAX_BYTES), frame, {})
        self.assertEqual((code, answer["error"]), (400, "malformed"))
        self.assertEqual(store_snapshot(world.fx.store), before)
