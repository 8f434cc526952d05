"""
The wire protocol of claudemesh, shared by the broker and the client: JSON
text frames over a WebSocket, one object per frame with a C{type}.

  - L{claudemesh.protocol.codes}: close codes and reasons, limits, name and
    id shapes, key prefixes, L{Refusal} (the one error), L{encode};
  - L{claudemesh.protocol.inbound}: the frames clients send, validated by
    L{decode};
  - L{claudemesh.protocol.outbound}: the frames the broker sends, as typed
    values with C{to_wire()}.

Everything is importable from here (C{protocol.decode},
C{protocol.CLOSE_KICKED}, C{protocol.Push}); docs/protocol.md describes the
frames for people.
"""

from claudemesh.protocol.codes import (  # noqa: F401
    CLOSE_BANNED,
    CLOSE_GOING_AWAY,
    CLOSE_KICKED,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    MAX_CURSOR_LENGTH,
    MAX_GROUP_LENGTH,
    MAX_GROUPS,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_SAFE_INTEGER,
    MAX_SUMMARY_LENGTH,
    MIN_KEY_PREFIX,
    PRIORITIES,
    PUSH_ENVELOPE_BYTES,
    REASON_BANNED,
    REASON_DISCONNECTED,
    REASON_FLOOD,
    REASON_KICKED,
    REASON_SESSION_REPLACED,
    REASON_SHUTTING_DOWN,
    ROLES,
    SIGNED_SKEW_MS,
    STATUSES,
    WS_STATUS_SOURCES,
    Refusal,
    encode,
    error_frame,
    has_nul,
    is_valid_group,
    is_valid_id,
    is_valid_name,
    key_matches,
    revoked_message,
)
from claudemesh.protocol.inbound import (  # noqa: F401
    FRAME_TYPES,
    MAX_INVITE_TOKEN,
    MAX_TARGET_LENGTH,
    AuditQuery,
    AuditVerify,
    Ban,
    ClientAck,
    CreateInvite,
    Disconnect,
    Hello,
    Join,
    JoinGroup,
    Kick,
    Leave,
    LeaveGroup,
    ListBans,
    ListInvites,
    ListMembers,
    ListPeers,
    MessageStatus,
    RevokeInvite,
    Send,
    SetRole,
    SetStatus,
    SetSummary,
    Unban,
    decode,
    has_lone_surrogate,
)
from claudemesh.protocol.outbound import (  # noqa: F401
    Ack,
    AuditResult,
    AuditVerifyResult,
    BanAck,
    DisconnectAck,
    HelloAck,
    InviteCreated,
    InvitesList,
    JoinAck,
    KickAck,
    LeaveAck,
    ListBansResult,
    MembersList,
    MessageStatusResult,
    PeersList,
    Push,
    RevokeInviteAck,
    SetRoleAck,
    SystemPush,
    UnbanAck,
)
