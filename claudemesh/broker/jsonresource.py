"""
The base of the broker's HTTP routes: JSON answers for unknown paths (404)
and for methods a route does not implement (405 with C{Allow}), instead of
twisted.web's HTML pages, its 501 for methods it has never heard of, and the
500 (with a traceback in the log) it gives a HEAD on a route without GET.

L{claudemesh.broker.web} builds the tree; the POST routes
(L{claudemesh.broker.hookroute}, L{claudemesh.broker.meshroutes}) are
JSONResources too.
"""

import json

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

JSON_CONTENT_TYPE = b"application/json"


def json_body(request, code, document):
    """
    Set the response code and JSON headers of C{request} and return the
    encoded body.

    @param request: the L{twisted.web.server.Request} being answered.
    @param code: the HTTP status code.
    @param document: a JSON-serialisable object.
    @return: the body, as L{bytes}.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    # Health answers describe this instant; a cache in between must not
    # replay an old "ready".
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def without_body_for_head(request, body):
    """
    C{body}, or for a HEAD request nothing, with the length it would have
    had: dropped here rather than by twisted.web, which logs a line for
    every HEAD answered with a body (any stranger could fill the log).
    """
    if request.method == b"HEAD" and body is not NOT_DONE_YET:
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return b""
    return body


class JSONResource(Resource):
    """
    A resource whose unknown children answer 404 JSON and whose unsupported
    methods answer 405 JSON, instead of Twisted's HTML pages.
    """

    def getChild(self, path, request):
        return NotFoundResource()

    def render(self, request):
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            # As twisted.web does, HEAD is GET without the body; but not
            # through Resource.render_HEAD, which calls a render_GET the
            # POST routes do not have.
            method = "GET"
        render_method = getattr(self, "render_" + method, None)
        if render_method is None:
            allowed = {name[len("render_"):] for name in dir(self)
                       if name.startswith("render_") and name != "render_HEAD"}
            if "GET" in allowed:
                allowed.add("HEAD")
            allowed = sorted(allowed)
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
            body = json_body(request, 405, {"error": "method_not_allowed"})
        else:
            body = render_method(request)
        return without_body_for_head(request, body)


class NotFoundResource(JSONResource):
    """
    Any path the broker does not serve: 404 C{{"error": "not_found"}} for
    every method.
    """

    def getChild(self, path, request):
        return self

    def render(self, request):
        return without_body_for_head(request, json_body(request, 404, {"error": "not_found"}))
