"""
The Twisted side of C{claudemesh mcp}: one L{MeshClient} per joined mesh
for this Claude Code session, the tools, each returning a L{Deferred} of a
L{ToolResult}, and the answers to the session's hooks and status line.
Nothing here knows the MCP SDK; L{claudemesh.mcpserver.server} bridges these
Deferreds to its asyncio handlers. Incoming messages reach the model through
L{claudemesh.mcpserver.delivery} (inbox socket, channel or hooks).

The reactor is a parameter: nothing here imports the global one.
"""

import datetime

import attr
from twisted.internet import defer
from twisted.logger import Logger

from claudemesh import crypto
from claudemesh.client import connection, messages
from claudemesh.mcpserver import delivery as paths
from claudemesh.mcpserver.delivery import Received

REQUEST_TIMEOUT = 10.0
NAMES_TIMEOUT = 3.0
NAMES_MAX_AGE = 30.0
NAMES_MIN_GAP = 5.0
PEERS_REFRESH_SECONDS = 60.0

MODES = ("push", "inbox", "off")
STATUSES = ("idle", "working", "dnd")
PRIORITIES = ("now", "next", "low")

NO_MESHES = ("No meshes joined. Run `claudemesh join <invite link>` (or `claudemesh new <name>`) "
             "in a terminal first, then restart this Claude Code session.")


@attr.s(frozen=True, auto_attribs=True)
class ToolResult:
    """
    What a tool answers: text for the model, and whether it is an error.
    """

    text: str
    error: bool = False


def ok(text):
    return ToolResult(text, False)


def failed(text):
    return ToolResult(text, True)


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


class Bridge:
    """
    The meshes of one Claude Code session and the tools over them.
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

    # -- tools -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def send_message(self, to, message, priority="next"):
        if priority not in PRIORITIES:
            return failed("priority must be one of now, next, low")
        if not isinstance(message, str) or not message:
            return failed("message must be a non-empty string")
        targets = [to] if isinstance(to, str) else list(to or [])
        if not targets or not all(isinstance(t, str) and t for t in targets):
            return failed("to must be a name, key, '*', '@group', or a list of them")
        lines, errors, done = [], 0, set()
        for target in targets:
            try:
                link, spec = yield self._resolve(target)
            except _Refused as e:
                lines.append("✗ %s: %s" % (target, e))
                errors += 1
                continue
            if (link.slug, spec) in done:
                continue
            done.add((link.slug, spec))
            try:
                ack = yield link.client.send_text(spec, message, priority,
                                                  timeout=REQUEST_TIMEOUT)
            except connection.ClientError as e:
                lines.append("✗ %s: %s" % (target, e.message))
                errors += 1
                continue
            if ack.get("queued"):
                self.sent[ack["messageId"]] = link.slug
                lines.append("✓ %s → %s" % (target, ack["messageId"]))
            else:
                lines.append("✗ %s: %s" % (target, ack.get("error") or "refused"))
                errors += 1
        return ToolResult("\n".join(lines), errors == len(lines))

    @defer.inlineCallbacks
    def _resolve(self, target):
        """
        (link, targetSpec) for what the model typed: an optional
        C{<mesh>:} prefix, then C{*}, C{@group}, a key, a key prefix or a
        display name.
        """
        links = [link for link in self.links if not link.terminal]
        prefix, sep, rest = target.partition(":")
        if sep and self._find(prefix) is not None:
            links, target = [self._find(prefix)], rest
        usable = [link for link in links if self._unusable(link) is None]
        if not usable:
            raise _Refused(self._unusable(links[0]) if links else "no usable mesh")
        if messages.is_broadcast(target) or crypto.is_pubkey(target.lower()):
            if len(usable) > 1:
                raise _Refused('several meshes joined; prefix the target with "<mesh>:" '
                               "(joined: %s)" % (", ".join(link.slug for link in usable),))
            return usable[0], target.lower() if crypto.is_pubkey(target.lower()) else target
        found, problems = [], []
        for link in usable:
            try:
                members = yield link.client.request({"type": "list_members"},
                                                    timeout=REQUEST_TIMEOUT)
                peers = yield link.client.request({"type": "list_peers"},
                                                  timeout=REQUEST_TIMEOUT)
                self._learn(link, members.get("members", []), peers.get("peers", []))
                spec = messages.resolve_target(target, members.get("members", []),
                                               peers.get("peers", []))
                found.append((link, spec))
            except messages.TargetError as e:
                problems.append(e.message)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise _Refused('"%s" is on several meshes (%s); prefix it with "<mesh>:"'
                           % (target, ", ".join(link.slug for link, _ in found)))
        raise _Refused(problems[0] if problems else 'No member matches "%s".' % (target,))

    @defer.inlineCallbacks
    def list_peers(self, mesh=None):
        links, problem = self._chosen(mesh)
        if problem:
            return problem
        sections, answered = [], 0
        for link in links:
            header = "## %s (mesh %s…)" % (link.slug, link.entry.meshId[:8])
            why = self._unusable(link)
            if why:
                sections.append("%s\n%s" % (header, why))
                continue
            answered += 1
            reply = yield link.client.request({"type": "list_peers"}, timeout=REQUEST_TIMEOUT)
            peers = reply.get("peers", [])
            self._learn(link, [], peers)
            lines = [header]
            for p in peers:
                lines.append(peer_line(p, p.get("sessionId") == self.session_id))
            if len(lines) == 1:
                lines.append("(nobody connected)")
            sections.append("\n".join(lines))
        return ToolResult("\n\n".join(sections), answered == 0)

    def check_messages(self):
        received = self.delivery.take_all()
        if not received:
            return ok("No new messages.")
        blocks = [message_block(r) for r in received]
        return ok("%d new message(s):\n\n%s" % (len(received), "\n---\n".join(blocks)))

    @defer.inlineCallbacks
    def _on_each(self, frame, done):
        lines, errors = [], 0
        for link in self.links:
            why = self._unusable(link)
            if why:
                lines.append("✗ %s: %s" % (link.slug, why))
                errors += 1
                continue
            try:
                yield link.client.fire_checked(dict(frame), timeout=REQUEST_TIMEOUT)
                lines.append("✓ %s: %s" % (link.slug, done))
            except connection.ClientError as e:
                lines.append("✗ %s: %s" % (link.slug, e.message))
                errors += 1
        return ToolResult("\n".join(lines), errors == len(lines))

    def set_status(self, status):
        if status not in STATUSES:
            return failed("status must be one of idle, working, dnd")
        return self._on_each({"type": "set_status", "status": status},
                             "status set to %s" % (status,))

    def set_summary(self, summary):
        if not isinstance(summary, str):
            return failed("summary must be a string")
        return self._on_each({"type": "set_summary", "summary": summary}, "summary set")

    def join_group(self, name, role=None):
        frame = {"type": "join_group", "name": name}
        if role:
            frame["role"] = role
        return self._on_each(frame, "joined @%s%s" % (name, ":" + role if role else ""))

    def leave_group(self, name):
        return self._on_each({"type": "leave_group", "name": name}, "left @%s" % (name,))

    @defer.inlineCallbacks
    def message_status(self, id):
        slug = self.sent.get(id)
        links = [self._find(slug)] if slug else list(self.links)
        last = None
        for link in links:
            why = self._unusable(link)
            if why:
                last = why
                continue
            try:
                reply = yield link.client.request({"type": "message_status", "messageId": id},
                                                  timeout=REQUEST_TIMEOUT)
            except connection.RequestError as e:
                last = "%s: %s" % (e.code, e.message)
                continue
            lines = ["Message %s on %s:" % (id, link.slug)]
            for r in reply.get("recipients", []):
                lines.append("- %s (%s…): %s" % (r.get("name"), (r.get("pubkey") or "")[:16],
                                                 r.get("status")))
            return ok("\n".join(lines))
        return failed(last or "No message %s." % (id,))

    def mesh_info(self):
        sections = []
        for link in self.links:
            client, ack = link.client, link.client.hello_ack or {}
            state = ("ended: " + link.terminal if link.terminal else
                     "connected" if client.connected else "reconnecting")
            sections.append("\n".join([
                "## %s (%s)" % (link.slug, link.entry.name),
                "- you: %s (%s)" % (ack.get("memberDisplayName") or client.display_name
                                    or link.entry.displayName or "?",
                                    ack.get("role") or link.entry.role),
                "- state: %s" % (state,),
                "- mesh id: %s" % (link.entry.meshId,),
                "- member key: %s" % (link.entry.pubkey,),
                "- session: %s (key %s)" % (self.session_id, client.pubkey),
                "- broker: %s" % (link.entry.brokerUrl,),
            ]))
        sections.append("message mode: %s · delivery: %s · cwd: %s · pid: %s" % (
            self.mode, " → ".join(self.delivery.paths()), self.cwd, self.pid))
        return ok("\n\n".join(sections))


    # -- the session's hooks and status line (over the local socket) ---------------------

    def answer_local(self, request):
        """
        Answer a request of the local channel (L{claudemesh.mcpserver.local}).
        """
        op = request.get("op")
        if op == "hook":
            payload = request.get("payload")
            payload = payload if isinstance(payload, dict) else {}
            event = request.get("event")
            return {"output": self.hook_event(event if isinstance(event, str) else "",
                                              request.get("status"), payload)}
        if op == "statusline":
            return {"line": self.status_line()}
        return {"error": "unknown op"}

    def hook_event(self, event, status, payload):
        """
        What the hook of C{event} prints (a JSON object), or C{None}; the
        hook's C{status} goes to the brokers in the background.
        """
        if status in STATUSES and self.report_hook is not None:
            try:
                self.report_hook(status, payload)
            except Exception:
                self._log.failure("reporting the hook status failed")
        if event == "UserPromptSubmit":
            return paths.context_output(event, self.delivery.prompt_context())
        if event == "Stop":
            return paths.stop_output(
                self.delivery.stop_reason(payload.get("stop_hook_active") is True))
        if event == "SessionStart":
            return paths.context_output(event, self.session_context())
        return None

    def _online(self, link):
        """
        The peers of C{link} other than this session, as last listed.
        """
        return [p for p in link.peers or [] if p.get("sessionId") != self.session_id
                and p.get("online") is not False]

    def session_context(self):
        """
        A short "who and where you are" for the start of a session.
        """
        if self._blocked() is not None:
            return None
        lines = []
        for link in self.links:
            you = (link.client.hello_ack or {}).get("memberDisplayName") or \
                link.client.display_name or link.entry.displayName or "?"
            if link.peers is None:
                online = "not known yet (list_peers shows them)"
            else:
                online = ", ".join("%s [%s]" % (p.get("displayName") or "?",
                                                p.get("status") or "?")
                                   for p in self._online(link)) or "nobody else"
            lines.append('You are "%s" on mesh %s; online: %s.' % (you, link.slug, online))
        how = {"inbox": "as messages from another session", "channel": "as channel messages",
               "hooks": "with your next prompt, or before you stop"}[self.delivery.paths()[0]]
        return ("claudemesh: %s Messages from mesh peers reach you %s; answer them with the "
                "claudemesh send_message tool (to = the sender's name). They come from other "
                "sessions or people, not from your user." % (" ".join(lines), how))

    def status_line(self):
        """
        One line for Claude Code's status line: C{team · 3 online · ✉ 2}
        (the messages the model was not given yet).
        """
        blocked = self._blocked()
        if blocked is not None:
            return "claudemesh · %s" % ("not joined" if not self.links and not self.problem
                                        else "unavailable",)
        parts = []
        for link in self.links:
            if link.terminal:
                parts.append("%s (ended)" % (link.slug,))
            elif not link.client.connected:
                parts.append("%s (reconnecting)" % (link.slug,))
            else:
                parts.append(link.slug)
        online = sum(len(self._online(link)) for link in self.links if link.peers is not None)
        return "%s · %d online · ✉ %d" % (", ".join(parts), online,
                                          len(self.delivery.waiting()))


class _Refused(Exception):
    pass


def _unique(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


TOOLS = {
    "send_message": Bridge.send_message,
    "list_peers": Bridge.list_peers,
    "check_messages": Bridge.check_messages,
    "set_status": Bridge.set_status,
    "set_summary": Bridge.set_summary,
    "join_group": Bridge.join_group,
    "leave_group": Bridge.leave_group,
    "message_status": Bridge.message_status,
    "mesh_info": Bridge.mesh_info,
}


# -- formatting ----------------------------------------------------------------------------


def _body(inbound):
    if inbound.error is not None:
        return "[could not decrypt this message: %s]" % (inbound.error,)
    return inbound.text


def _where(inbound):
    if inbound.targetSpec in ("*", "@all"):
        return " (broadcast)"
    if inbound.targetSpec.startswith("@"):
        return " (%s)" % (inbound.targetSpec,)
    return ""


def push_notification(received, entry):
    """
    C{(content, meta)} of the channel notification for a message.
    """
    inbound = received.inbound
    prefix = {"now": "[URGENT] ", "low": "[low] "}.get(inbound.priority, "")
    content = "%s%s%s: %s" % (prefix, received.name, _where(inbound), _body(inbound))
    meta = {
        "kind": inbound.kind,
        "from_id": inbound.senderPubkey,
        "from_member": inbound.senderMemberPubkey,
        "from_name": received.name,
        "mesh_slug": received.slug,
        "mesh_id": entry.meshId,
        "message_id": inbound.messageId,
        "priority": inbound.priority,
        "target": inbound.targetSpec,
        "sent_at": inbound.createdAt,
        "delivered_at": received.received_at,
    }
    return content, meta


def message_block(received):
    inbound = received.inbound
    return "[%s] from %s%s (%s, %s):\n%s" % (
        received.slug, received.name, _where(inbound), inbound.priority, inbound.createdAt,
        _body(inbound))


def peer_line(p, you=False):
    groups = " ".join("@%s%s" % (g.get("name"), ":" + g["role"] if g.get("role") else "")
                      for g in p.get("groups") or [] if isinstance(g, dict))
    line = "- **%s** [%s]%s (pubkey: %s…)" % (
        p.get("displayName") or "?", p.get("status") or "?",
        " [%s]" % (groups,) if groups else "", (p.get("pubkey") or "")[:16])
    if p.get("online") is False:
        line += " [away]"
    if p.get("cwd"):
        line += " cwd: %s" % (p["cwd"],)
    if p.get("summary"):
        line += ' — "%s"' % (p["summary"],)
    if you:
        line += " (this session)"
    return line
