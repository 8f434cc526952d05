"""
How mesh messages and peers read for the model: the channel notification, a
message block of C{check_messages}, a line of C{list_peers}.
"""


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
