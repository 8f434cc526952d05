"""
The answers of C{claudemesh mcp} to its own Claude Code session's commands,
over the local channel (L{claudemesh.mcpserver.local}): what a hook prints
(pending messages as context, a Stop that makes Claude read them, the
session's mesh at start) and the status line.
"""

from claudemesh.mcpserver import delivery as paths
from claudemesh.mcpserver.tools import STATUSES


class SessionAnswers:
    """
    Mixed into L{claudemesh.mcpserver.bridge.Bridge}: uses its links, its
    delivery paths and C{_blocked}.
    """

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
