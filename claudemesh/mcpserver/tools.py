"""
The MCP tools of C{claudemesh mcp}, as methods over the L{Bridge}: each
returns a L{Deferred} of a L{ToolResult} (or one at once), never fails
(L{claudemesh.mcpserver.bridge.Bridge.call} turns failures into results).
"""

import attr
from twisted.internet import defer

from claudemesh import crypto
from claudemesh.client import connection, messages
from claudemesh.mcpserver.texts import message_block, peer_line
from claudemesh.protocol import PRIORITIES, STATUSES

REQUEST_TIMEOUT = 10.0


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


class _Refused(Exception):
    pass


class Tools:
    """
    The tools, mixed into L{claudemesh.mcpserver.bridge.Bridge}: they use its
    links, its name cache and its C{_unusable}, C{_chosen}, C{_find} and
    C{_learn}.
    """

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

    @defer.inlineCallbacks
    def mesh_info(self):
        sections = []
        for link in self.links:
            client, ack = link.client, link.client.hello_ack or {}
            if client.connected and not link.terminal:
                # Issue 17: who left since the last rotation, as of now.
                yield client.mesh_keys.refresh_status()
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
                # Issue 17: for owners and admins, who left since the last rotation.
                "- mesh key: %s" % (client.mesh_keys.describe(),),
            ]))
        sections.append("message mode: %s · delivery: %s · cwd: %s · pid: %s" % (
            self.mode, " → ".join(self.delivery.paths()), self.cwd, self.pid))
        return ok("\n\n".join(sections))


TOOLS = {
    "send_message": Tools.send_message,
    "list_peers": Tools.list_peers,
    "check_messages": Tools.check_messages,
    "set_status": Tools.set_status,
    "set_summary": Tools.set_summary,
    "join_group": Tools.join_group,
    "leave_group": Tools.leave_group,
    "message_status": Tools.message_status,
    "mesh_info": Tools.mesh_info,
}
