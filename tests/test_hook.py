# -*- test-case-name: tests.test_hook -*-
"""
Tests for L{claudemesh.broker.hook.HookStatusResource} (C{POST
/hook/set-status}) against a broker on an inline SQLite store and a fake clock, with
in-memory requests.
"""

import io
import json

import attr
from twisted.trial import unittest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from claudemesh import crypto
from claudemesh.broker.hookroute import HookStatusResource
from tests.meshfixture import BrokerFixture, store_snapshot

MAX_BODY = 2048


class HookTestCase(unittest.TestCase):
    settings = {"hook_rate_limit_per_min": 5}

    def setUp(self):
        self.fx = BrokerFixture(**self.settings)
        self.resource = HookStatusResource(self.fx.broker.hooks, self.fx.broker.metrics, MAX_BODY)
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")

    def post(self, body, peer=None, timestamp=None, signature=None, headers=None,
             sign_body=None, mesh_id=None):
        """
        POST C{body} (a dict, or raw bytes) signed by C{peer}'s member key;
        returns C{(code, decoded body)}.
        """
        peer = peer or self.alice
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        timestamp = self.fx.now_ms() if timestamp is None else timestamp
        mesh_id = peer.mesh.id if mesh_id is None else mesh_id
        if signature is None:
            signed = body if sign_body is None else sign_body
            signature = peer.identity.sign(crypto.hook_string(mesh_id, timestamp, signed))
        request = DummyRequest([b""])
        request.method = b"POST"
        request.uri = request.path = b"/hook/set-status"
        request.content = io.BytesIO(body)
        if headers is None:
            headers = {
                b"X-Claudemesh-Mesh": mesh_id.encode(),
                b"X-Claudemesh-Pubkey": peer.pubkey.encode(),
                b"X-Claudemesh-Timestamp": str(timestamp).encode(),
                b"X-Claudemesh-Signature": signature.encode(),
            }
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name, [value])
        request.requestHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        result = self.resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        self.fx.flush()
        self.assertTrue(request.finished)
        return request.responseCode, json.loads(b"".join(request.written))

    def snapshot(self):
        self.fx.flush()
        statuses = {}
        for mesh in self.fx.broker.meshes._meshes.values():
            for s in mesh.sessions.values():
                statuses[s.presence_id] = s.status
        return store_snapshot(self.fx.store), statuses, dict(self.fx.broker.hooks.pending)

    def body(self, status="working", **fields):
        payload = {"status": status, "cwd": "", "pid": 0, "session_id": None}
        payload.update(fields)
        return payload


class MatchingTests(HookTestCase):
    def test_by_session_id(self):
        """A signed request naming a session id sets that session's status from the hook."""
        self.alice.connect(session_id="a1")
        code, reply = self.post(self.body(session_id="a1"))
        self.assertEqual(code, 200)
        self.assertEqual(reply, {"ok": True, "presence_id": self.alice.session.presence_id,
                                 "status": "working"})
        self.assertEqual((self.alice.session.status.status, self.alice.session.status.source),
                         ("working", "hook"))

    def test_by_claude_session_id(self):
        """A session id that is a session's claudeSessionId hint matches that session."""
        self.alice.connect(session_id="mcp-1-x", claudeSessionId="claude-abc")
        code, reply = self.post(self.body(session_id="claude-abc"))
        self.assertEqual((code, reply["presence_id"]), (200, self.alice.session.presence_id))
        self.assertEqual(self.alice.session.status.status, "working")

    def test_by_pid_and_cwd(self):
        """Without a known session id, pid+cwd picks the session of that process."""
        self.alice.connect(session_id="one", pid=100, cwd="/w")
        first = self.alice.session
        self.alice.connect(session_id="two", pid=200, cwd="/w")
        second = self.alice.session
        self.fx.advance(1)
        code, reply = self.post(self.body(pid=100, cwd="/w"))
        self.assertEqual((code, reply["presence_id"]), (200, first.presence_id))
        self.assertEqual((first.status.status, second.status.status), ("working", "idle"))

    def test_by_cwd(self):
        """With only a cwd, the most recently connected session in that cwd is matched."""
        self.alice.connect(session_id="old", pid=100, cwd="/w")
        self.fx.advance(1)
        self.alice.connect(session_id="new", pid=200, cwd="/w")
        newest = self.alice.session
        code, reply = self.post(self.body(pid=999, cwd="/w"))
        self.assertEqual((code, reply["presence_id"]), (200, newest.presence_id))

    def test_own_session_wins_over_same_id_of_another_member(self):
        """When another member has a session with the same id, the caller's own session matches."""
        self.bob.connect(session_id="same")
        self.alice.connect(session_id="same")
        code, reply = self.post(self.body(session_id="same"))
        self.assertEqual((code, reply.get("presence_id")), (200, self.alice.session.presence_id))
        self.assertEqual(self.bob.session.status.status, "idle")

    def test_pending_applied_on_hello(self):
        """An unknown session id is pending; a hello of that session within 10 s gets the status."""
        code, reply = self.post(self.body(session_id="later"))
        self.assertEqual((code, reply), (200, {"ok": True, "pending": True}))
        self.fx.advance(9)
        self.alice.connect(session_id="later")
        self.assertEqual((self.alice.session.status.status, self.alice.session.status.source),
                         ("working", "hook"))

    def test_pending_expires(self):
        """A pending hook status older than 10 s is not applied to a later hello."""
        self.post(self.body(session_id="later"))
        self.fx.advance(11)
        self.alice.connect(session_id="later")
        self.assertEqual(self.alice.session.status.status, "idle")

    def test_pending_is_per_member(self):
        """A pending status is keyed on the member: the same session id of another gets nothing."""
        self.post(self.body(session_id="shared"))
        self.bob.connect(session_id="shared")
        self.assertEqual(self.bob.session.status.status, "idle")

    def test_never_clears_dnd(self):
        """A hook idle does not clear a manual dnd."""
        self.alice.connect(session_id="a1")
        self.alice.request({"type": "set_status", "status": "dnd"})
        code, reply = self.post(self.body("idle", session_id="a1"))
        self.assertEqual((code, reply["status"]), (200, "dnd"))
        self.assertEqual(self.alice.session.status.status, "dnd")


class RefusalTests(HookTestCase):
    def setUp(self):
        HookTestCase.setUp(self)
        self.alice.connect(session_id="a1")
        self.bob.connect(session_id="b1")
        self.before = self.snapshot()

    def assertUnchanged(self):
        self.assertEqual(self.snapshot(), self.before)

    def assertRefused(self, result, code, error):
        self.assertEqual((result[0], result[1]["ok"], result[1]["error"]), (code, False, error))
        self.assertUnchanged()

    def test_other_members_session(self):
        """A session id of another member's session matches nothing of it (pending, no 403)."""
        code, reply = self.post(self.body(session_id="b1"))
        self.assertEqual((code, reply), (200, {"ok": True, "pending": True}))
        store, statuses, _ = self.snapshot()
        self.assertEqual((store, statuses), self.before[:2])
        self.assertEqual(self.bob.session.status.status, "idle")

    def test_missing_headers(self):
        """A request without the signature headers is 401."""
        self.assertRefused(self.post(self.body(session_id="a1"), headers={}), 401, "unauthorized")

    def test_bad_signature(self):
        """A signature by another key is 401."""
        other = crypto.Identity.generate()
        ts = self.fx.now_ms()
        body = json.dumps(self.body(session_id="a1")).encode()
        signature = other.sign(crypto.hook_string(self.alice.mesh.id, ts, body))
        self.assertRefused(self.post(body, timestamp=ts, signature=signature), 401,
                           "unauthorized")

    def test_timestamp_off(self):
        """A timestamp 61 s away from the broker's clock is 401, either way."""
        for offset in (-61_000, 61_000):
            self.assertRefused(self.post(self.body(session_id="a1"),
                                         timestamp=self.fx.now_ms() + offset),
                               401, "unauthorized")

    def test_body_tampered(self):
        """A body changed after signing is 401."""
        signed = json.dumps(self.body("idle", session_id="a1")).encode()
        self.assertRefused(self.post(self.body("dnd", session_id="a1"), sign_body=signed),
                           401, "unauthorized")

    def test_other_mesh_in_signature(self):
        """A signature over another mesh id does not authenticate for this one."""
        ts = self.fx.now_ms()
        body = json.dumps(self.body(session_id="a1")).encode()
        signature = self.alice.identity.sign(crypto.hook_string("other-mesh", ts, body))
        self.assertRefused(self.post(body, timestamp=ts, signature=signature), 401,
                           "unauthorized")

    def test_non_member_key(self):
        """A correctly signed request by a key that is no member of the mesh is 401."""
        self.alice.identity = crypto.Identity.generate()
        self.assertRefused(self.post(self.body(session_id="a1")), 401, "unauthorized")

    def test_revoked_member(self):
        """A revoked member's key is 401."""
        revoked = attr.evolve(self.alice.member, revoked_at=self.fx.now_ms())
        self.fx.broker.meshes.cached(self.alice.mesh.id).put_member(revoked)
        self.assertRefused(self.post(self.body(session_id="a1")), 401, "unauthorized")

    def test_bad_json(self):
        """A body that is not JSON is 400 malformed."""
        self.assertRefused(self.post(b"{not json"), 400, "malformed")

    def test_deeply_nested_json(self):
        """
        A body nested deeper than the JSON parser recurses is 400 malformed,
        not a 503 with a traceback in the broker log.
        """
        self.assertRefused(self.post(b"[" * (MAX_BODY - 1)), 400, "malformed")

    def test_bad_status(self):
        """A status outside idle/working/dnd is 400 malformed."""
        self.assertRefused(self.post(self.body("sleeping", session_id="a1")), 400, "malformed")

    def test_bad_pid(self):
        """A pid that is not a non-negative integer is 400 malformed."""
        self.assertRefused(self.post(self.body(session_id="a1", pid="12")), 400, "malformed")

    def test_too_large(self):
        """A body over the maximum is 413 and changes nothing."""
        body = self.body(session_id="a1", cwd="x" * MAX_BODY)
        result = self.post(body)
        self.assertEqual((result[0], result[1]["ok"]), (413, False))
        self.assertUnchanged()

    def test_rate_limit(self):
        """Past hook_rate_limit_per_min a key gets 429; another member's key is unaffected."""
        for i in range(5):
            # Distinct requests (the same one again would be a replay).
            self.assertEqual(self.post(self.body("idle", session_id="a1", pid=i))[0], 200)
        self.before = self.snapshot()
        self.assertRefused(self.post(self.body("working", session_id="a1")), 429, "rate_limited")
        self.assertEqual(self.post(self.body("working", session_id="b1", ), peer=self.bob)[0],
                         200)
        # the bucket refills with time
        self.fx.advance(13)
        self.assertEqual(self.post(self.body("working", session_id="a1"))[0], 200)

