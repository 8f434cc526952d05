"""
C{POST /hook/set-status}: the Claude Code hook reports a session's status.

The request is signed by the member key over
C{claudemesh-hook/1|POST|/hook/set-status|meshId|timestamp|sha256(body)}
(docs/protocol.md, signed strings) and carried in the C{X-Claudemesh-*} headers; the broker
hook part of the broker core (L{claudemesh.broker.hook}) decides which of
the caller's own sessions it is about.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server

from claudemesh import protocol
from claudemesh.broker.jsonresource import JSONResource

HTTP_STATUS = {
    "unauthorized": 401,
    "replayed": 401,
    "forbidden": 403,
    "malformed": 400,
    "rate_limited": 429,
    "too_large": 413,
}


def json_response(request, code, body):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class LateAnswer:
    """
    The answer to a request rendered C{NOT_DONE_YET}, sent only while its
    client is still there: a client that hung up before the answer was
    ready gets none, and twisted.web is never asked to finish a request
    whose connection is gone (which it logs as a critical error with a
    traceback: issue 11).
    """

    def __init__(self, request):
        self._request = request
        self.gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, failure):
        self.gone = True

    def send(self, code, document):
        if self.gone:
            return
        request = self._request
        request.write(json_response(request, code, document))
        request.finish()


class HookStatusResource(JSONResource):
    isLeaf = True
    _log = Logger()

    def __init__(self, hooks, metrics, max_body_bytes):
        JSONResource.__init__(self)
        self._hooks = hooks
        self._metrics = metrics
        self._max = max_body_bytes

    def _count(self, result):
        if self._metrics is not None:
            self._metrics.hook_requests.labels(result).inc()

    def render_POST(self, request):
        length = request.getHeader(b"content-length")
        body = request.content.read(self._max + 1) if request.content is not None else b""
        if (length is not None and length.isdigit() and int(length) > self._max) or len(
                body) > self._max:
            self._count("too_large")
            return json_response(request, 413, {"ok": False, "error": "payload too large"})

        def header(name):
            # twisted.web hands header values over as bytes; the core
            # compares and signs text. Undecodable values count as missing.
            value = request.getHeader(name)
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    value = None
            return value if value is not None else ""

        d = defer.maybeDeferred(
            self._hooks.report,
            header(b"x-claudemesh-mesh"), header(b"x-claudemesh-pubkey"),
            header(b"x-claudemesh-timestamp"), header(b"x-claudemesh-signature"), body)

        answer = LateAnswer(request)

        def done(result):
            self._count("pending" if result.get("pending") else "ok")
            answer.send(200, result)

        def refused(f):
            f.trap(protocol.Refusal)
            self._count(f.value.code)
            answer.send(HTTP_STATUS.get(f.value.code, 400), {
                "ok": False, "error": f.value.code, "message": f.value.message})

        def failed(f):
            self._log.failure("hook request failed", f)
            self._count("error")
            answer.send(503, {"ok": False, "error": "unavailable"})

        d.addCallbacks(done, refused).addErrback(failed)
        return server.NOT_DONE_YET
