"""
Outbound frames: what the broker sends, as typed values.

Each class is one frame type; its attributes are the wire fields (camelCase,
as in docs/protocol.md). L{to_wire} gives the dict to encode: a field whose
default is C{None} is left out while it is C{None} (C{restored}, C{error},
C{brokenAt}, …); every other field is always sent. Replies get their
request's C{_reqId} from the dispatcher, not from here.

Rows inside lists (peers, members, invites, audit entries) stay plain dicts
built in one place each by the part of the broker that owns them.
"""

import attr


def outbound(type_name):
    """
    Make an attrs class the typed form of outbound frames of C{type_name}.
    """

    def build(cls):
        cls = attr.s(frozen=True, slots=True, kw_only=True)(cls)
        fields = attr.fields(cls)
        names = tuple(f.name for f in fields)
        optional = frozenset(f.name for f in fields if f.default is None)

        def to_wire(self):
            wire = {"type": type_name}
            for name in names:
                value = getattr(self, name)
                if value is None and name in optional:
                    continue
                wire[name] = value
            return wire

        cls.TYPE = type_name
        cls.to_wire = to_wire
        return cls

    return build


def _optional():
    return attr.ib(default=None)


# -- sessions ----------------------------------------------------------------


@outbound("hello_ack")
class HelloAck:
    presenceId = attr.ib()
    meshId = attr.ib()
    meshName = attr.ib()
    memberId = attr.ib()
    memberDisplayName = attr.ib()
    role = attr.ib()
    serverTime = attr.ib()
    statusTtlSeconds = attr.ib()
    hookFreshWindowSeconds = attr.ib()
    restored = _optional()
    watch = _optional()


@outbound("peers_list")
class PeersList:
    peers = attr.ib()


# -- messages ----------------------------------------------------------------


@outbound("ack")
class Ack:
    id = attr.ib()
    messageId = attr.ib()
    queued = attr.ib()
    error = _optional()


@outbound("push")
class Push:
    messageId = attr.ib()
    meshId = attr.ib()
    senderPubkey = attr.ib()
    senderMemberPubkey = attr.ib()
    targetSpec = attr.ib()
    priority = attr.ib()
    nonce = attr.ib()
    ciphertext = attr.ib()
    createdAt = attr.ib()
    seq = attr.ib()


@outbound("push")
class SystemPush:
    """
    A push the broker sends on its own: a presence or status event.
    """

    subtype = attr.ib(default="system")
    event = attr.ib()
    eventData = attr.ib()
    messageId = attr.ib()
    meshId = attr.ib()
    senderPubkey = attr.ib(default="system")
    priority = attr.ib(default="low")
    nonce = attr.ib(default="")
    ciphertext = attr.ib(default="")
    createdAt = attr.ib()


@outbound("message_status_result")
class MessageStatusResult:
    messageId = attr.ib()
    targetSpec = attr.ib()
    recipients = attr.ib()


# -- membership and moderation -------------------------------------------------


@outbound("join_ack")
class JoinAck:
    meshId = attr.ib()
    memberId = attr.ib()
    role = attr.ib()
    slug = attr.ib()
    meshName = attr.ib()


@outbound("invite_created")
class InviteCreated:
    inviteId = attr.ib()
    expiresAt = attr.ib()
    role = attr.ib()
    maxUses = attr.ib()
    meshId = attr.ib()
    meshName = attr.ib()


@outbound("invites_list")
class InvitesList:
    invites = attr.ib()


@outbound("revoke_invite_ack")
class RevokeInviteAck:
    inviteId = attr.ib()


@outbound("set_role_ack")
class SetRoleAck:
    target = attr.ib()
    role = attr.ib()


@outbound("leave_ack")
class LeaveAck:
    pass


@outbound("members_list")
class MembersList:
    members = attr.ib()


@outbound("disconnect_ack")
class DisconnectAck:
    kicked = attr.ib()
    affected = attr.ib()


@outbound("kick_ack")
class KickAck:
    kicked = attr.ib()
    affected = attr.ib()


@outbound("ban_ack")
class BanAck:
    banned = attr.ib()


@outbound("unban_ack")
class UnbanAck:
    unbanned = attr.ib()


@outbound("list_bans_result")
class ListBansResult:
    bans = attr.ib()


# -- audit ---------------------------------------------------------------------


@outbound("audit_result")
class AuditResult:
    total = attr.ib()
    entries = attr.ib()


@outbound("audit_verify_result")
class AuditVerifyResult:
    valid = attr.ib()
    entries = attr.ib()
    brokenAt = _optional()
