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


class JSONResource(Resource):
    """
    A resource whose unknown children answer 404 JSON and whose unsupported
    methods answer 405 JSON, instead of Twisted's HTML pages.
    """

    def getChild(self, path, request):
        return NotFoundResource()

    def render(self, request):
        method = request.method.decode("ascii", "replace")
        head = method == "HEAD"
        if head:
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
            return json_body(request, 405, {"error": "method_not_allowed"})
        body = render_method(request)
        if head and body is not NOT_DONE_YET:
            # Dropped here, with its length said, rather than by twisted.web,
            # which logs a line for every HEAD that returns a body.
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            return b""
        return body


class NotFoundResource(JSONResource):
    """
    Any path the broker does not serve: 404 C{{"error": "not_found"}} for
    every method.
    """

    def getChild(self, path, request):
        return self

    def render(self, request):
        return json_body(request, 404, {"error": "not_found"})
