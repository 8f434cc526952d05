# -*- test-case-name: tests.test_meshroutes -*-
"""
Tests for C{POST /meshes} and C{POST /join} (L{claudemesh.broker.meshroutes})
with in-memory requests against a broker on an inline SQLite store.
"""

import io
import json

from twisted.trial import unittest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from claudemesh import crypto
from claudemesh.broker.meshroutes import JoinResource, MeshCreationResource
from claudemesh.invite import encode_token, sign_invite
from tests.meshfixture import BrokerFixture

MAX_BODY = 4096
TOKEN = "s3cret-admin-token"


class RouteTestCase(unittest.TestCase):
    def setUp(self):
        self.fx = BrokerFixture()

    def post(self, resource, body, headers=()):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        request = DummyRequest([b""])
        request.method = b"POST"
        request.content = io.BytesIO(body)
        request.requestHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        for name, value in headers:
            request.requestHeaders.setRawHeaders(name, [value])
        result = resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        self.fx.flush()
        self.assertTrue(request.finished)
        return request.responseCode, json.loads(b"".join(request.written))

    def create_body(self, identity=None, name="Ops"):
        identity = identity or crypto.Identity.generate()
        now = self.fx.now_ms()
        return {"name": name, "ownerPubkey": identity.pubkey, "displayName": "root",
                "timestamp": now,
                "signature": identity.sign(crypto.create_mesh_string(name, identity.pubkey, now))}


class MeshCreationTests(RouteTestCase):
    def meshes(self, token):
        return MeshCreationResource(self.fx.broker.membership, token, MAX_BODY)

    def test_with_token(self):
        """With a token configured, the right Bearer token creates the mesh."""
        code, body = self.post(self.meshes(TOKEN), self.create_body(),
                               [(b"authorization", b"Bearer " + TOKEN.encode())])
        self.assertEqual(code, 200)
        self.assertEqual(set(body), {"meshId", "memberId", "slug", "name"})
        mesh = []
        self.fx.store.get_mesh(body["meshId"]).addCallback(mesh.append)
        self.assertEqual(mesh[0].name, "Ops")

    def test_missing_or_wrong_token(self):
        """A missing or wrong token is 401 {error: unauthorized} and nothing is created."""
        for headers in ([], [(b"authorization", b"Bearer nope")],
                        [(b"authorization", TOKEN.encode())]):
            code, body = self.post(self.meshes(TOKEN), self.create_body(), headers)
            self.assertEqual((code, body["error"]), (401, "unauthorized"))

    def test_open_without_token(self):
        """Without a token (loopback broker), a local request creates the mesh."""
        code, _ = self.post(self.meshes(None), self.create_body())
        self.assertEqual(code, 200)

    def test_forwarded_request_refused_when_open(self):
        """Without a token, a request that came through a proxy is refused."""
        for header in (b"x-forwarded-for", b"forwarded", b"x-real-ip"):
            code, body = self.post(self.meshes(None), self.create_body(),
                                   [(header, b"203.0.113.9")])
            self.assertEqual((code, body["error"]), (401, "unauthorized"))

    def test_web_page_refused_when_open(self):
        """
        Without a token, a request a browser sent (it carries Origin, or
        Sec-Fetch-Site) is refused: a web page the developer visits must not
        create meshes on their loopback broker. The client sends neither.
        """
        for header, value in ((b"origin", b"https://evil.example"), (b"origin", b"null"),
                              (b"sec-fetch-site", b"cross-site")):
            code, body = self.post(self.meshes(None), self.create_body(), [(header, value)])
            self.assertEqual((code, body.get("error")), (401, "unauthorized"), header)
        code, _ = self.post(self.meshes(None), self.create_body())
        self.assertEqual(code, 200)

    def test_bad_signature(self):
        """A body signed by another key is 400 bad_signature."""
        body = self.create_body()
        body["signature"] = crypto.Identity.generate().sign(b"x")
        code, answer = self.post(self.meshes(None), body)
        self.assertEqual((code, answer["error"]), (400, "bad_signature"))

    def test_malformed_and_oversized(self):
        """Bad JSON is 400 malformed; a body over the limit is 413."""
        code, answer = self.post(self.meshes(None), b"{nope")
        self.assertEqual((code, answer["error"]), (400, "malformed"))
        code, answer = self.post(self.meshes(None), b"x" * (MAX_BODY + 1))
        self.assertEqual(code, 413)

    def test_timestamp_skew(self):
        """A creation signed two minutes ago is refused."""
        identity = crypto.Identity.generate()
        then = self.fx.now_ms() - 120_000
        body = {"name": "Ops", "ownerPubkey": identity.pubkey, "displayName": "root",
                "timestamp": then,
                "signature": identity.sign(crypto.create_mesh_string("Ops", identity.pubkey,
                                                                     then))}
        code, answer = self.post(self.meshes(None), body)
        self.assertEqual((code, answer["error"]), (400, "timestamp_skew"))


class JoinRouteTests(RouteTestCase):
    def setUp(self):
        RouteTestCase.setUp(self)
        self.owner = self.fx.create_mesh()
        self.owner.connect()
        self.join_resource = JoinResource(self.fx.broker.membership, MAX_BODY)

    def token(self, uses=1):
        reply = self.owner.request({"type": "create_invite", "maxUses": uses})
        invite = sign_invite(self.owner.identity, self.owner.mesh.id, "team", reply["inviteId"],
                             "member", reply["expiresAt"], "ws://127.0.0.1:7900/ws")
        return encode_token(invite), reply["inviteId"]

    def body(self, token, invite_id, identity=None, name="dora"):
        identity = identity or crypto.Identity.generate()
        now = self.fx.now_ms()
        return {"invite": token, "pubkey": identity.pubkey, "displayName": name,
                "timestamp": now,
                "signature": identity.sign(crypto.join_string(invite_id, identity.pubkey, name,
                                                              now))}

    def test_join(self):
        """POST /join with a valid body answers like join_ack."""
        token, invite_id = self.token()
        code, body = self.post(self.join_resource, self.body(token, invite_id))
        self.assertEqual(code, 200)
        self.assertEqual(body["role"], "member")
        self.assertEqual(body["meshId"], self.owner.mesh.id)
        self.assertEqual(body["meshName"], "team")

    def test_exhausted_is_410(self):
        """The second joiner of a one-use invite gets 410 invite_exhausted."""
        token, invite_id = self.token()
        self.post(self.join_resource, self.body(token, invite_id))
        code, body = self.post(self.join_resource, self.body(token, invite_id))
        self.assertEqual((code, body["error"]), (410, "invite_exhausted"))

    def test_missing_field(self):
        """A body without displayName is 400 malformed naming the field."""
        token, invite_id = self.token()
        body = self.body(token, invite_id)
        del body["displayName"]
        code, answer = self.post(self.join_resource, body)
        self.assertEqual((code, answer["error"]), (400, "malformed"))
        self.assertIn("displayName", answer["message"])
