"""
C{POST /meshes} and C{POST /join}: the HTTP side of membership.

C{/meshes} creates a mesh and its owner. It is authorised by the admin token
(C{Authorization: Bearer <token>}); when the operator configured none the
route is open only if every listening endpoint is loopback and the request
carries no forwarding header (a reverse proxy in front must not open it to
the world) and nothing a browser adds (C{Origin}, C{Sec-Fetch-Site}: a web
page must not use it) — L{claudemesh.broker.tap.resolve_admin_token} decides which.

C{/join} takes the same body as the C{join} frame.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server

from claudemesh import protocol
from claudemesh.broker.hookroute import LateAnswer, json_response
from claudemesh.broker.jsonresource import JSONResource
from claudemesh.broker.membership import token_matches
from claudemesh.protocol import has_lone_surrogate

FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
# What browsers add to a request a page makes, and the claudemesh client never
# sends.
BROWSER_HEADERS = (b"origin", b"sec-fetch-site")

# Refusal codes and the HTTP status each one answers with.
HTTP_STATUS = {
    "unauthorized": 401,
    "replayed": 401,
    "malformed": 400,
    "timestamp_skew": 400,
    "bad_signature": 400,
    "bad_proof": 400,
    "invite_bad_signature": 400,
    "invite_mesh_mismatch": 400,
    "invite_not_found": 404,
    "invite_expired": 410,
    "invite_revoked": 410,
    "invite_exhausted": 410,
    "revoked": 403,
}


class _JSONPost(JSONResource):
    """
    A POST route with a JSON body of bounded size whose answer comes from a
    Deferred.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, max_body_bytes):
        JSONResource.__init__(self)
        self._max = max_body_bytes

    def render_POST(self, request):
        length = request.getHeader(b"content-length")
        body = request.content.read(self._max + 1) if request.content is not None else b""
        if (length is not None and length.isdigit() and int(length) > self._max) or len(
                body) > self._max:
            return json_response(request, 413, {"error": "payload too large"})
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return json_response(request, 400, {"error": "malformed",
                                                "message": "body is not valid JSON"})
        if has_lone_surrogate(document):
            return json_response(request, 400, {"error": "malformed",
                                                "message": "body holds an unpaired surrogate"})
        late = LateAnswer(request)
        d = defer.maybeDeferred(self.answer, request, document)

        def done(result):
            late.send(200, result)

        def refused(f):
            f.trap(protocol.Refusal)
            late.send(HTTP_STATUS.get(f.value.code, 400), {
                "error": f.value.code, "message": f.value.message})

        def failed(f):
            self._log.failure("{route} failed", f, route=type(self).__name__)
            late.send(503, {"error": "unavailable"})

        d.addCallbacks(done, refused).addErrback(failed)
        return server.NOT_DONE_YET

    def answer(self, request, document):
        raise NotImplementedError()


class MeshCreationResource(_JSONPost):
    """
    C{POST /meshes {name, ownerPubkey, displayName, timestamp, signature}} →
    C{{meshId, memberId, slug, name}}.
    """

    def __init__(self, membership, admin_token, max_body_bytes):
        _JSONPost.__init__(self, max_body_bytes)
        self._membership = membership
        self._token = admin_token

    def answer(self, request, document):
        if self._token is not None:
            authorization = (request.getHeader(b"authorization") or b"").decode(
                "latin-1")
            if not token_matches(self._token, authorization):
                raise protocol.Refusal("unauthorized", "a valid admin token is required")
        elif any(request.getHeader(h) is not None for h in FORWARDING_HEADERS):
            raise protocol.Refusal("unauthorized", "open mesh creation is for local clients only")
        elif any(request.getHeader(h) is not None for h in BROWSER_HEADERS):
            # A web page the developer visits can POST here (no preflight
            # for a text/plain body), and sign with a key it made.
            raise protocol.Refusal("unauthorized", "open mesh creation is not for web pages")
        return self._membership.create_mesh(document)


class JoinResource(_JSONPost):
    """
    C{POST /join {invite, pubkey, displayName, timestamp, signature}} →
    C{{meshId, memberId, role, slug, meshName}}.
    """

    def __init__(self, membership, max_body_bytes):
        _JSONPost.__init__(self, max_body_bytes)
        self._membership = membership

    def answer(self, request, document):
        if not isinstance(document, dict):
            raise protocol.Refusal("malformed", "body must be a JSON object")
        # The same validation as the WebSocket frame.
        document = dict(document, type="join")
        document.pop("_reqId", None)
        return self._membership.join(protocol.decode(json.dumps(document)))
