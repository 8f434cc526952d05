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
    # Issue 17: the mesh's current key epoch, and for owners and admins
    # what they should know about it (docs/protocol.md "Mesh key epochs").
    keyEpoch = attr.ib(default=0)
    keyStatus = _optional()
    # The largest frame the broker takes (absent: no limit).
    maxMessageBytes = _optional()
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
    # With stale_key_epoch and unknown_key_epoch (issue 17).
    currentEpoch = _optional()
    # Deliveries made, and how many a live session takes at once (absent
    # on a refusal and on the ack of a re-sent duplicate).
    recipients = _optional()
    pushed = _optional()


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
    # Broadcasts and group messages: the mesh key epoch that opens them.
    keyEpoch = _optional()


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
    # [{name, memberPubkey, sessionId, online}], one per session.
    sessions = _optional()


@outbound("kick_ack")
class KickAck:
    kicked = attr.ib()
    affected = attr.ib()
    sessions = _optional()


@outbound("ban_ack")
class BanAck:
    banned = attr.ib()


@outbound("unban_ack")
class UnbanAck:
    unbanned = attr.ib()


@outbound("list_bans_result")
class ListBansResult:
    bans = attr.ib()


# -- mesh key epochs (issue 17) --------------------------------------------------


@outbound("rotate_mesh_key_ack")
class RotateMeshKeyAck:
    """
    A rotation's part was staged (C{committed} false, C{staged} copies so
    far) or the rotation committed (C{members} copies).
    """

    epoch = attr.ib()
    committed = attr.ib()
    staged = _optional()
    members = _optional()


@outbound("share_mesh_key_ack")
class ShareMeshKeyAck:
    epoch = attr.ib()
    shared = attr.ib()


@outbound("mesh_key")
class MeshKey:
    """
    The caller's member's sealed copy of one epoch's key.
    """

    epoch = attr.ib()
    sealedKey = attr.ib()
    sealedBy = attr.ib()


@outbound("mesh_key_status_result")
class MeshKeyStatusResult:
    """
    C{keyEpoch} for everyone; C{keyStatus} (as in C{hello_ack}) for owners
    and admins.
    """

    keyEpoch = attr.ib()
    keyStatus = _optional()


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
