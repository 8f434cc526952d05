"""
The Twisted side of C{claudemesh mcp}: one L{MeshClient} per joined mesh
for this Claude Code session, what comes in on them, and the plumbing of the
tools (L{claudemesh.mcpserver.tools}) and of the answers to the session's
hooks and status line (L{claudemesh.mcpserver.answers}).
Nothing here knows the MCP SDK; L{claudemesh.mcpserver.server} bridges these
Deferreds to its asyncio handlers. Incoming messages reach the model through
L{claudemesh.mcpserver.delivery} (inbox socket, channel or hooks).

The reactor is a parameter: nothing here imports the global one.
"""

import datetime

from twisted.internet import defer
from twisted.logger import Logger

from claudemesh.client import connection
from claudemesh.mcpserver import delivery as paths
from claudemesh.mcpserver.answers import SessionAnswers
from claudemesh.mcpserver.delivery import Received
from claudemesh.mcpserver.texts import push_notification
from claudemesh.mcpserver.tools import (  # noqa: F401 (ok, ToolResult: the tools' answers)
    TOOLS,
    ToolResult,
    Tools,
    failed,
    ok,
)

NAMES_TIMEOUT = 3.0
NAMES_MAX_AGE = 30.0
NAMES_MIN_GAP = 5.0
PEERS_REFRESH_SECONDS = 60.0

MODES = ("push", "inbox", "off")

NO_MESHES = ("No meshes joined. Run `claudemesh join <invite link>` (or `claudemesh new <name>`) "
             "in a terminal first, then restart this Claude Code session.")


def iso_now(reactor):
    moment = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000,)


class MeshLink:
    """
    This session on one mesh.

    @ivar terminal: the message to show once the broker ended the session
        (kick, ban, refusal, replacement); C{None} while usable.
    """

    def __init__(self, entry, client):
        self.entry = entry
        self.client = client
        self.terminal = None
        self.names = {}
        self.names_at = None
        self.names_tried_at = None
        self.peers = None  # the last list_peers answer
        self.peers_at = None
        self.peers_call = None

    @property
    def slug(self):
        return self.entry.slug


class Bridge(Tools, SessionAnswers):
    """
    The meshes of one Claude Code session and the tools over them: the
    connections and what comes in here, the tools in L{Tools}, the answers
    to the session's hooks and status line in L{SessionAnswers}.
    """

    _log = Logger()

    def __init__(self, reactor, entries, session_id, notify, session_keys=None,
                 display_name=None, pid=None, cwd=None, hello_extra=None, mode="push",
                 problem=None, client_factory=connection.MeshClient, delivery=None,
                 report_hook=None):
        """
        @param entries: the L{MeshEntry}s to connect to.
        @param notify: C{notify(content, meta)} delivers a channel
            notification to Claude Code; may return a L{Deferred}. Used as
            the only live path when no C{delivery} is given.
        @param session_keys: mesh slug → session L{crypto.Identity}.
        @param mode: C{push} (deliver each message), C{inbox} (say that one
            arrived) or C{off} (nothing live); what the model was not given
            is kept for C{check_messages} in all modes.
        @param problem: why there are no meshes (an unreadable config); every
            tool answers it.
        @param delivery: the session's L{paths.Delivery}.
        @param report_hook: C{report_hook(status, payload)} posts a hook's
            status to the brokers (the hook asked us to, over the local
            socket).
        """
        if mode not in MODES:
            raise ValueError("message mode must be one of %s" % (", ".join(MODES),))
        self.reactor = reactor
        self.session_id = session_id
        self.notify = notify
        self.mode = mode
        self.pid = pid
        self.cwd = cwd
        self.problem = problem
        self.display_name = display_name
        self.delivery = delivery if delivery is not None else paths.Delivery(
            mode, set(), notify=notify, channel_ready=lambda: True)
        self.report_hook = report_hook
        self.sent = {}  # messageId -> slug
        self.links = []
        session_keys = session_keys or {}
        for entry in entries:
            link = MeshLink(entry, None)
            link.client = client_factory(
                reactor, entry, session_id, session_identity=session_keys.get(entry.slug),
                receive=True, display_name=display_name or entry.displayName, pid=pid, cwd=cwd,
                hello_extra=hello_extra,
                on_message=lambda inbound, link=link: self._message(link, inbound),
                on_event=lambda frame, link=link: self._event(link, frame),
                on_terminal_close=lambda code, reason, message, link=link: self._ended(
                    link, message),
                on_connect=lambda ack, link=link: self._connected(link, ack))
            self.links.append(link)
        self.on_connect = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self):
        for link in self.links:
            link.client.start().addErrback(lambda f: None)
            link.client.when_done().addErrback(self._done, link)

    def stop(self):
        """
        Close every connection cleanly; fires when all are closed.
        """
        ds = []
        for link in self.links:
            if link.peers_call is not None and link.peers_call.active():
                link.peers_call.cancel()
            ds.append(link.client.stop().addErrback(lambda f: None))
        return defer.DeferredList(ds)

    def _done(self, failure, link):
        e = failure.value
        if isinstance(e, connection.ClientError) and link.terminal is None:
            link.terminal = e.message
            self._log.warn("mesh {slug}: {message}", slug=link.slug, message=e.message)

    def _ended(self, link, message):
        link.terminal = message
        self._log.warn("mesh {slug}: {message}", slug=link.slug, message=message)
        self.delivery.system(message, {
            "kind": "system", "event": "session_ended", "mesh_slug": link.slug,
            "mesh_id": link.entry.meshId}, urgent=True)

    def _connected(self, link, ack):
        self._log.info("connected to mesh {slug} as {name}", slug=link.slug,
                       name=ack.get("memberDisplayName"))
        self._refresh_peers(link)
        for callback in list(self.on_connect):
            callback(link, ack)

    def status_ttl(self):
        """
        The broker's C{statusTtlSeconds} (the smallest over the meshes).
        """
        values = [link.client.hello_ack.get("statusTtlSeconds") for link in self.links
                  if link.client.hello_ack]
        values = [v for v in values if isinstance(v, (int, float)) and v > 0]
        return min(values) if values else None

    def report_status(self, status):
        """
        The transcript's inference (C{source: jsonl}) on every usable mesh.
        """
        for link in self.links:
            if link.terminal is None and link.client.connected:
                try:
                    link.client.fire({"type": "set_status", "status": status,
                                      "source": "jsonl"})
                except connection.ClientError:
                    pass

    # -- incoming --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _message(self, link, inbound):
        """
        A new message push; fires once a path took it (then the client
        acknowledges it to the broker).
        """
        if self.delivery.seen(inbound.messageId):
            # It reached this session before (an earlier connection or MCP
            # server): acknowledge it again, give it to nobody.
            return
        name = yield self._name_of(link, inbound.senderMemberPubkey, inbound.senderPubkey)
        reply_to = name if len(self.links) == 1 else "%s:%s" % (link.slug, name)
        received = Received(link.slug, inbound, name, iso_now(self.reactor), reply_to=reply_to)
        yield self.delivery.route(received, push_notification(received, link.entry))

    def _event(self, link, frame):
        data = frame.get("eventData") or {}
        if not isinstance(data, dict):
            data = {}
        name = data.get("name")
        if isinstance(name, str):
            for key in (data.get("memberPubkey"), data.get("pubkey")):
                if isinstance(key, str):
                    link.names[key] = name
        event = frame.get("event")
        if event not in ("peer_joined", "peer_left"):
            return
        self._refresh_peers(link)
        verb = "joined" if event == "peer_joined" else "left"
        where = " %s" % (link.slug,) if len(self.links) > 1 else ""
        self.delivery.system('Peer "%s" %s the mesh%s' % (name or "?", verb, where), {
            "kind": "system", "event": event, "mesh_slug": link.slug,
            "mesh_id": link.entry.meshId, "eventData": data})

    def _refresh_peers(self, link):
        """
        Refresh the peer list the status line and the session context show,
        at most every L{NAMES_MIN_GAP} seconds (a burst of joins asks once,
        after the gap).
        """
        if link.peers_call is not None and link.peers_call.active():
            return
        now = self.reactor.seconds()
        wait = 0.0 if link.peers_at is None else max(0.0, NAMES_MIN_GAP - (now - link.peers_at))
        link.peers_call = self.reactor.callLater(wait, self._ask_peers, link)

    @defer.inlineCallbacks
    def _ask_peers(self, link):
        link.peers_call = None
        if link.terminal or not link.client.connected:
            return
        link.peers_at = self.reactor.seconds()
        try:
            reply = yield link.client.request({"type": "list_peers"}, timeout=NAMES_TIMEOUT)
        except Exception as e:
            self._log.debug("list_peers for the status line failed: {why}", why=e)
            return
        peers = reply.get("peers", [])
        if isinstance(peers, list):
            self._learn(link, [], peers)

    @defer.inlineCallbacks
    def _name_of(self, link, member_pubkey, pubkey):
        for key in (member_pubkey, pubkey):
            if key in link.names:
                return link.names[key]
        now = self.reactor.seconds()
        if link.names_tried_at is None or now - link.names_tried_at >= NAMES_MIN_GAP:
            try:
                yield self._refresh_names(link)
            except Exception:
                pass
        for key in (member_pubkey, pubkey):
            if key in link.names:
                return link.names[key]
        return "peer-%s" % ((member_pubkey or pubkey or "?")[:8],)

    @defer.inlineCallbacks
    def _refresh_names(self, link):
        link.names_tried_at = self.reactor.seconds()
        client = link.client
        members = yield client.request({"type": "list_members"}, timeout=NAMES_TIMEOUT)
        peers = yield client.request({"type": "list_peers"}, timeout=NAMES_TIMEOUT)
        self._learn(link, members.get("members", []), peers.get("peers", []))

    def _learn(self, link, members, peers):
        # Every caller passes a whole list_peers answer.
        link.peers = [p for p in peers if isinstance(p, dict)]
        link.peers_at = self.reactor.seconds()
        for m in members:
            if isinstance(m, dict) and m.get("memberPubkey") and m.get("name"):
                link.names[m["memberPubkey"]] = m["name"]
        for p in peers:
            if isinstance(p, dict) and p.get("displayName"):
                for key in (p.get("pubkey"), p.get("memberPubkey")):
                    if key:
                        link.names.setdefault(key, p["displayName"])
        link.names_at = self.reactor.seconds()

    # -- tool plumbing ---------------------------------------------------------------------

    def _blocked(self):
        """
        The result every tool gives when no mesh can be used at all, else
        C{None}.
        """
        if self.problem:
            return failed(self.problem)
        if not self.links:
            return failed(NO_MESHES)
        if all(link.terminal for link in self.links):
            return failed("\n".join(_unique(link.terminal for link in self.links)))
        return None

    def _unusable(self, link):
        """
        Why C{link} cannot be used now, or C{None}.
        """
        if link.terminal:
            return link.terminal
        if not link.client.connected:
            return ("Not connected to mesh %s yet (broker %s); reconnecting in the background, "
                    "try again shortly." % (link.slug, link.entry.brokerUrl))
        return None

    def _find(self, slug):
        for link in self.links:
            if link.slug == slug:
                return link
        return None

    def _chosen(self, mesh):
        """
        The links a tool acts on: the one named C{mesh}, else all.
        """
        if mesh:
            link = self._find(mesh)
            if link is None:
                return None, failed('Not a member of a mesh called "%s" (joined: %s).'
                                    % (mesh, ", ".join(link.slug for link in self.links)))
            return [link], None
        return list(self.links), None

    def call(self, name, arguments):
        """
        Run tool C{name}; fires with a L{ToolResult}, never fails.
        """
        method = TOOLS.get(name)
        if method is None:
            return defer.succeed(failed("Unknown tool %r." % (name,)))
        blocked = self._blocked()
        if blocked is not None:
            return defer.succeed(blocked)
        try:
            d = defer.maybeDeferred(method, self, **(arguments or {}))
        except TypeError as e:
            return defer.succeed(failed("Bad arguments for %s: %s" % (name, e)))

        def crashed(f):
            if f.check(TypeError):
                return failed("Bad arguments for %s: %s" % (name, f.getErrorMessage()))
            if f.check(connection.ClientError):
                return failed(f.value.message)
            self._log.failure("tool {name} failed", f, name=name)
            return failed("Internal error in %s: %s" % (name, f.getErrorMessage()))

        return d.addErrback(crashed)

def _unique(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
