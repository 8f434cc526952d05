"""
The twisted.web tree of C{claudemesh ui}: the page, its JSON API and its
live WebSocket, all behind one gate (L{Gate}).

The gate, for every request and the live connection's handshake:

  - C{Host} must be this server's own loopback address and port (a page of
    another site that re-points its name at 127.0.0.1 is refused);
  - C{Origin}, when sent, must be this server's origin, and it must be sent
    on anything but C{GET} and on the WebSocket handshake; C{Sec-Fetch-Site},
    when sent, must be C{same-origin} or C{none};
  - the run's token must come with it: C{?token=} on the page, its assets
    and the live URL, C{Authorization: Bearer} on the API;
  - nothing else is answered but C{403} with a short plain-text body.

There are no cookies and no CORS headers; every answer carries a strict
Content-Security-Policy and asks not to be framed, sniffed, cached or
referred. JSON answers escape C{<}, C{>} and C{&}, so peer-provided text is
inert even if something reads it as HTML; the page builds its DOM with
C{textContent} only.
"""

import hmac
import html
import json
import os
import urllib.parse

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from claudemesh.client import connection, messages

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {
    b"app.js": "application/javascript; charset=utf-8",
    b"app.css": "text/css; charset=utf-8",
}
MAX_BODY = 256 * 1024
MAX_LIVE_MESSAGE = 4096

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                 "\u2028": "\\u2028", "\u2029": "\\u2029"}


def encode_json(document):
    """
    JSON bytes in which C{<}, C{>} and C{&} never appear as such.
    """
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in _JSON_ESCAPES.items():
        text = text.replace(char, escaped)
    return text.encode("utf-8")


class Gate:
    """
    Who may talk to this UI server: the one token of this run, from this
    server's own origin.
    """

    def __init__(self, token, port=None):
        self.token = token
        self.port = port

    @property
    def hosts(self):
        return {"127.0.0.1:%d" % (self.port,), "localhost:%d" % (self.port,)}

    @property
    def origins(self):
        return {"http://" + host for host in self.hosts}

    def refusal(self, method, headers, token, live=False):
        """
        Why a request may not pass (a short text), or C{None}.

        @param headers: the request headers, names lowercased, C{str}
            values.
        @param token: the token the request carries, or C{None}.
        """
        if self.port is None:
            return "not listening"
        if headers.get("host") not in self.hosts:
            return "wrong host"
        origin = headers.get("origin")
        if origin is None:
            if method != "GET" or live:
                return "no origin"
        elif origin not in self.origins:
            return "foreign origin"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return "cross-site request"
        if not isinstance(token, str) or not hmac.compare_digest(
                token.encode("utf-8"), self.token.encode("utf-8")):
            return "bad token"
        return None

    def check(self, request, live=False):
        """
        C{None} if C{request} may pass, else the refusal text.
        """
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = values[-1].decode("latin-1")
        token = None
        authorization = headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            token = authorization[len("Bearer "):]
        else:
            values = request.args.get(b"token")
            if values:
                token = values[-1].decode("latin-1")
        return self.refusal(request.method.decode("latin-1"), headers, token, live)


def secure_headers(request, gate):
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    if host not in gate.hosts:
        host = "127.0.0.1:%s" % (gate.port,)
    request.setHeader(b"Content-Security-Policy", (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws://%s; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'" % (host,)).encode("ascii"))
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Cross-Origin-Opener-Policy", b"same-origin")
    request.setHeader(b"Cross-Origin-Resource-Policy", b"same-origin")


def refuse(request, gate, status=403, text="Forbidden"):
    secure_headers(request, gate)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return (text + "\n").encode("utf-8")


def _answer_json(request, gate, document, status=200):
    secure_headers(request, gate)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return encode_json(document)


class GatedResource(resource.Resource):
    """
    A leaf that answers only what passes the gate.
    """

    isLeaf = True

    def __init__(self, ui):
        resource.Resource.__init__(self)
        self.ui = ui

    def render(self, request):
        if self.ui.gate.check(request) is not None:
            return refuse(request, self.ui.gate)
        return self.render_allowed(request)


class NotFoundResource(GatedResource):
    """
    Any other path: past the gate, 404.
    """

    def render_allowed(self, request):
        return refuse(request, self.ui.gate, 404, "Not found")


class PageResource(GatedResource):
    """
    C{GET /?token=…}: the page, its asset URLs carrying the token.
    """

    isLeaf = False

    def getChild(self, name, request):
        if name == b"":
            return self
        return NotFoundResource(self.ui)

    def render_allowed(self, request):
        if request.method not in (b"GET", b"HEAD"):
            return refuse(request, self.ui.gate, 404, "Not found")
        with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as f:
            page = f.read()
        page = page.replace("__TOKEN__", html.escape(urllib.parse.quote(self.ui.gate.token)))
        secure_headers(request, self.ui.gate)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return page.encode("utf-8")


class StaticResource(GatedResource):
    """
    C{GET /static/app.js} and C{/static/app.css}, shipped in the package.
    """

    def render_allowed(self, request):
        name = request.postpath[0] if len(request.postpath) == 1 else None
        if request.method != b"GET" or name not in STATIC_FILES:
            return refuse(request, self.ui.gate, 404, "Not found")
        with open(os.path.join(STATIC_DIR, name.decode("ascii")), "rb") as f:
            body = f.read()
        secure_headers(request, self.ui.gate)
        request.setHeader(b"Content-Type", STATIC_FILES[name].encode("ascii"))
        return body


class APIResource(GatedResource):
    """
    C{/api/<name>}: JSON in, JSON out. Reads are C{GET} with C{?mesh=}; actions
    are C{POST} with a JSON object body (C{Content-Type: application/json}).
    """

    _log = Logger()

    GETS = ("meshes", "state", "invites", "bans", "audit")
    POSTS = ("send", "moderate", "invite", "revoke-invite", "rotate-key")

    def render_allowed(self, request):
        name = request.postpath[0].decode("latin-1") if len(request.postpath) == 1 else ""
        gate = self.ui.gate
        if request.method == b"GET" and name in self.GETS:
            arguments = {k.decode("latin-1"): v[-1].decode("utf-8", "replace")
                         for k, v in request.args.items()}
        elif request.method == b"POST" and name in self.POSTS:
            content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
            if content_type.lower() != b"application/json":
                return _answer_json(request, gate, {"error": "malformed",
                                                    "message": "send application/json"}, 415)
            body = request.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                return _answer_json(request, gate, {"error": "too_large",
                                                    "message": "body too large"}, 413)
            try:
                arguments = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                # RecursionError: nested deeper than the parser recurses.
                arguments = None
            if not isinstance(arguments, dict):
                return _answer_json(request, gate, {"error": "malformed",
                                                    "message": "send a JSON object"}, 400)
        else:
            return refuse(request, gate, 404, "Not found")
        d = defer.maybeDeferred(self.ui.call, name, arguments)

        def done(document):
            if not request.finished and not getattr(request, "_gone", False):
                request.write(_answer_json(request, gate, document))
                request.finish()

        def failed(f):
            if request.finished or getattr(request, "_gone", False):
                return
            status, document = 500, {"error": "internal", "message": "internal error"}
            e = f.value
            if isinstance(e, BadRequest):
                status, document = 400, {"error": "malformed", "message": e.message}
            elif isinstance(e, messages.TargetError):
                status, document = 404 if e.code == "not_found" else 409, {
                    "error": e.code, "message": e.message, "candidates": e.candidates}
            elif isinstance(e, connection.RequestError):
                status = 504 if e.code in ("timeout", "connection_lost") else 409
                document = {"error": e.code, "message": e.message}
                if e.frame.get("candidates"):
                    document["candidates"] = e.frame["candidates"]
            elif isinstance(e, connection.ClientError):
                status, document = 503, {"error": "unavailable", "message": e.message}
            else:
                self._log.failure("a UI request failed", f)
            request.write(_answer_json(request, gate, document, status))
            request.finish()

        request.notifyFinish().addErrback(lambda _: setattr(request, "_gone", True))
        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


class BadRequest(Exception):
    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


def _text(arguments, name, default=None, limit=4096):
    value = arguments.get(name, default)
    if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
        raise BadRequest("%r must be a non-empty string" % (name,))
    return value


def _number(arguments, name, default, low, high):
    value = arguments.get(name, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest("%r must be a whole number from %d to %d" % (name, low, high))
    return value


def _choice(arguments, name, choices, default=None):
    value = arguments.get(name, default)
    if value not in choices:
        raise BadRequest("%r must be one of %s" % (name, ", ".join(choices)))
    return value


class LiveProtocol(WebSocketServerProtocol):
    """
    The page's live connection: a snapshot, then every change of its mesh.
    The page sends nothing that matters.
    """

    def onConnect(self, request):
        headers = {k.lower(): v for k, v in request.headers.items()}
        params = request.params
        token = (params.get("token") or [None])[-1]
        ui = self.factory.ui
        if ui.gate.refusal("GET", headers, token, live=True) is not None:
            raise ConnectionDeny(403, "Forbidden")
        slug = (params.get("mesh") or [None])[-1]
        self.watch = ui.watch_for(slug)
        if self.watch is None:
            raise ConnectionDeny(404, "Not found")
        self._unsubscribe = None
        return None

    def onOpen(self):
        self.send_event(self.watch.snapshot())
        self._unsubscribe = self.watch.subscribe(self.send_event)

    def send_event(self, event):
        self.sendMessage(encode_json(event), isBinary=False)

    def onMessageFrameData(self, payload):
        # The page sends nothing that matters: its data is dropped as it
        # comes, so a message of many small frames holds no memory.
        pass

    def onMessage(self, payload, isBinary):
        pass

    def onClose(self, wasClean, code, reason):
        if getattr(self, "_unsubscribe", None) is not None:
            self._unsubscribe()
            self._unsubscribe = None


class UIServer:
    """
    The UI of one config: its meshes, the watchers made on demand, the gate
    and the resource tree.
    """

    def __init__(self, reactor, config, gate, make_watch, default_slug=None):
        """
        @param make_watch: C{make_watch(entry)} → a started L{MeshWatch}.
        """
        self.reactor = reactor
        self.config = config
        self.gate = gate
        self.make_watch = make_watch
        self.default_slug = default_slug or (config.meshes[0].slug if config.meshes else None)
        self.watches = {}

    def watch_for(self, slug=None):
        entry = self.config.find(slug or self.default_slug)
        if entry is None:
            return None
        watch = self.watches.get(entry.slug)
        if watch is None:
            watch = self.watches[entry.slug] = self.make_watch(entry)
        return watch

    def stop(self):
        return defer.gatherResults([w.stop() for w in self.watches.values()],
                                   consumeErrors=True)

    def resource(self):
        root = PageResource(self)
        root.putChild(b"static", StaticResource(self))
        root.putChild(b"api", APIResource(self))
        root.putChild(b"live", LiveResource(self))
        return root

    def site(self):
        site = QuietSite(self.resource())
        site.displayTracebacks = False
        return site

    # -- the API ------------------------------------------------------------------------

    def call(self, name, arguments):
        if name == "meshes":
            return {"default": self.default_slug, "meshes": [
                {"slug": m.slug, "name": m.name, "role": m.role, "displayName": m.displayName}
                for m in self.config.meshes]}
        slug = arguments.get("mesh")
        if slug is not None and not isinstance(slug, str):
            raise BadRequest("'mesh' must be a mesh slug")
        watch = self.watch_for(slug)
        if watch is None:
            raise BadRequest("no mesh called %r is joined" % (slug,))
        if name == "state":
            return watch.snapshot()
        if name == "send":
            return watch.send(_text(arguments, "to", limit=256),
                              _text(arguments, "text", limit=60_000),
                              _choice(arguments, "priority", ("now", "next", "low"), "next"))
        if name == "moderate":
            action = _choice(arguments, "action",
                             ("disconnect", "kick", "ban", "unban", "set_role"))
            role = None
            if action == "set_role":
                role = _choice(arguments, "role", ("member", "admin", "owner"))
            # A ban (and an unban after a rotating ban) rotates the mesh
            # key unless told not to (issue 17, decision 87).
            rotate = arguments.get("rotate", True)
            if not isinstance(rotate, bool):
                raise BadRequest("'rotate' must be true or false")
            return watch.moderate(action, _text(arguments, "target", limit=256), role,
                                  rotate=rotate)
        if name == "rotate-key":
            return watch.rotate_key(_text(arguments, "reason", "manual", limit=200))
        if name == "invite":
            return watch.invite(_choice(arguments, "role", ("member", "admin"), "member"),
                                _number(arguments, "uses", 1, 1, 10_000),
                                _number(arguments, "expiresIn", 7 * 86400, 60, 366 * 86400))
        if name == "invites":
            return watch.invites()
        if name == "revoke-invite":
            return watch.revoke_invite(_text(arguments, "inviteId", limit=128))
        if name == "bans":
            return watch.bans()
        if name == "audit":
            return watch.audit(_number(arguments, "limit", 100, 1, 500))
        raise BadRequest("unknown call")


class LiveResource(resource.Resource):
    """
    C{/live?token=…&mesh=…}: the gate (the handshake must carry this
    origin), then Autobahn's WebSocket resource.
    """

    isLeaf = True

    def __init__(self, ui):
        resource.Resource.__init__(self)
        self.ui = ui
        factory = WebSocketServerFactory()
        factory.protocol = LiveProtocol
        factory.ui = ui
        factory.noisy = False
        # Autobahn applies maxMessagePayloadSize to what it sends too, and a
        # snapshot grows with the mesh: no message limit, then; what the page
        # sends is held by the frame limit and never kept (LiveProtocol).
        factory.setProtocolOptions(maxMessagePayloadSize=0,
                                   maxFramePayloadSize=MAX_LIVE_MESSAGE,
                                   autoPingInterval=20, autoPingTimeout=30)
        self._websocket = WebSocketResource(factory)

    def render(self, request):
        if self.ui.gate.check(request, live=True) is not None:
            return refuse(request, self.ui.gate)
        return self._websocket.render(request)


class QuietSite(server.Site):
    """
    A Site that writes no access log: every URL here carries the token.
    """

    def log(self, request):
        pass
