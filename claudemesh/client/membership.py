"""
Becoming a member: creating a mesh (C{POST /meshes}) and joining one with
an invite (C{POST /join}), over HTTP with treq. Both return the
L{MeshEntry} to store in the config; neither writes it.
"""

import datetime
import json

from twisted.internet import defer

from claudemesh import crypto
from claudemesh.client import closes, messages
from claudemesh.client.config import MeshEntry
from claudemesh.client.connection import ClientError, Unreachable

HTTP_TIMEOUT = 10.0


class HTTPRefusal(ClientError):
    """
    The broker answered a membership request with an error.

    @ivar status: the HTTP status; @ivar code: the C{error} field.
    """

    def __init__(self, status, code, message):
        ClientError.__init__(self, message)
        self.status = status
        self.code = code


def iso_now(reactor):
    moment = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000,)


@defer.inlineCallbacks
def post_json(reactor, url, body, token=None, timeout=HTTP_TIMEOUT):
    """
    POST C{body} as JSON; returns C{(status, document)}.

    @raise Unreachable: the broker did not answer.
    """
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=timeout))
    headers = {b"Content-Type": [b"application/json"]}
    if token:
        headers[b"Authorization"] = [b"Bearer " + token.encode("utf-8")]
    try:
        response = yield client.post(url, data=json.dumps(body).encode("utf-8"),
                                     headers=headers, timeout=timeout)
        raw = yield response.content()
    except Exception as e:
        raise Unreachable("Cannot reach the broker at %s (%s)." % (url, _why(url, e))) from None
    finally:
        yield pool.closeCachedConnections()
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        document = {}
    if not isinstance(document, dict):
        document = {}
    return response.code, document


def _why(url, error):
    """
    A readable reason for a failed request: treq and the Agent wrap the
    real failures in lists of L{Failure}s.
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        failure = reasons[0]
        if closes.is_tls_failure(failure):
            return closes.tls_hint(url, closes.tls_error_text(failure))
        if failure.check(defer.CancelledError):
            return "no answer within %g s" % (HTTP_TIMEOUT,)
        return failure.getErrorMessage() or failure.type.__name__
    if isinstance(error, defer.CancelledError):
        return "no answer within %g s" % (HTTP_TIMEOUT,)
    return str(error) or type(error).__name__


def _refusal(status, document):
    code = document.get("error") or "http_%d" % (status,)
    message = document.get("message") or code
    return HTTPRefusal(status, code, message)


@defer.inlineCallbacks
def create_mesh(reactor, broker_url, name, display_name, token=None):
    """
    Make an owner identity and a mesh key, and create the mesh.
    """
    owner = crypto.Identity.generate()
    mesh_key = crypto.new_mesh_key()
    now = int(reactor.seconds() * 1000)
    body = messages.create_mesh_request(owner, name, display_name, now)
    status, document = yield post_json(
        reactor, messages.http_base(broker_url) + "/meshes", body, token)
    if status != 200 or not isinstance(document.get("meshId"), str):
        raise _refusal(status, document)
    return MeshEntry(
        meshId=document["meshId"], memberId=document["memberId"],
        slug=document.get("slug") or name, name=document.get("name") or name,
        pubkey=owner.pubkey, secretKey=owner.secret_hex, brokerUrl=broker_url,
        joinedAt=iso_now(reactor), meshKey=crypto.encode_mesh_key(mesh_key), role="owner",
        displayName=display_name)


@defer.inlineCallbacks
def join_mesh(reactor, parsed, display_name, identity=None):
    """
    Join with a parsed invite link (L{messages.ParsedInvite}); C{identity}
    is the key already used on that mesh, if any (a re-join keeps it).
    """
    identity = identity or crypto.Identity.generate()
    invite = parsed.invite
    broker_url = invite["brokerUrl"]
    now = int(reactor.seconds() * 1000)
    body = messages.join_request(parsed.token, identity, display_name, now)
    status, document = yield post_json(
        reactor, messages.http_base(broker_url) + "/join", body)
    if status != 200 or not isinstance(document.get("memberId"), str):
        raise _refusal(status, document)
    return MeshEntry(
        meshId=document.get("meshId") or invite["meshId"], memberId=document["memberId"],
        slug=document.get("slug") or invite["meshName"],
        name=document.get("meshName") or invite["meshName"],
        pubkey=identity.pubkey, secretKey=identity.secret_hex, brokerUrl=broker_url,
        joinedAt=iso_now(reactor),
        meshKey=crypto.encode_mesh_key(parsed.mesh_key) if parsed.mesh_key else "",
        meshKeyEpoch=parsed.mesh_key_epoch if parsed.mesh_key else 0,
        role=document.get("role") or invite["role"], displayName=display_name)
