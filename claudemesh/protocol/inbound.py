"""
Inbound frames: their types, field checks and L{decode}.

Every frame is one JSON object with a C{type}. L{decode} turns the text of a
frame into one of the attrs classes below, or raises L{Refusal} carrying
the exact error code (C{malformed} naming the field, C{unknown_type}) so the
WebSocket protocol can answer every bad frame. Field names are the wire names
(camelCase), as in docs/protocol.md.
"""

import json
import re

import attr

from claudemesh.crypto import is_pubkey
from claudemesh.protocol.codes import (
    MAX_CURSOR_LENGTH,
    MAX_GROUPS,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_SAFE_INTEGER,
    MAX_SUMMARY_LENGTH,
    PRIORITIES,
    ROLES,
    STATUSES,
    WS_STATUS_SOURCES,
    Refusal,
    has_nul,
    is_valid_group,
    is_valid_id,
    is_valid_name,
)

# -- field checks -------------------------------------------------------------
# Each check takes (name, value) and returns the value to keep, or raises
# _Bad(explanation); decode() turns that into `malformed` naming the field.


class _Bad(Exception):
    pass


_MISSING = object()


def _text(max_length, min_length=0):
    def check(value):
        if not isinstance(value, str):
            raise _Bad("must be a string")
        if not min_length <= len(value) <= max_length:
            raise _Bad("must be %d to %d characters" % (min_length, max_length))
        if has_nul(value):
            raise _Bad("must not contain NUL characters")
        return value

    return check


def _identifier(value):
    if not is_valid_id(value):
        raise _Bad("must be an id of 1-128 characters A-Z a-z 0-9 _ . : -")
    return value


def _integer(minimum=-MAX_SAFE_INTEGER, maximum=MAX_SAFE_INTEGER):
    def check(value):
        # bool is an int in Python, never in JSON.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("must be an integer")
        if value < minimum:
            raise _Bad("must be at least %d" % (minimum,))
        if value > maximum:
            raise _Bad("must be at most %d" % (maximum,))
        return value

    return check


def _boolean(value):
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _choice(*values):
    def check(value):
        if value not in values:
            raise _Bad("must be one of " + ", ".join(values))
        return value

    return check


def _name(value):
    if not is_valid_name(value):
        raise _Bad("must be 1-64 characters without '|' or control characters")
    return value


def _group(value):
    if not is_valid_group(value):
        raise _Bad("must be a group name like 'team' or 'team/backend'")
    return value


def _groups(value):
    if not isinstance(value, list) or len(value) > MAX_GROUPS:
        raise _Bad("must be a list of at most %d groups" % (MAX_GROUPS,))
    kept = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise _Bad("must hold objects {name, role?}")
        _group(item.get("name"))
        role = item.get("role")
        if role is not None and not (isinstance(role, str) and len(role) <= MAX_NAME_LENGTH
                                     and not has_nul(role)):
            raise _Bad("role must be a short string")
        kept.append((item["name"], role))
    return tuple(kept)


def _anything(value):
    return value


def field(check, default=_MISSING):
    """
    A frame field: C{check} validates the wire value; with no C{default} the
    field is required.
    """
    if default is _MISSING:
        return attr.ib(metadata={"check": check})
    return attr.ib(default=default, metadata={"check": check})


_REQ_ID = _text(MAX_ID_LENGTH)
FRAME_TYPES = {}


def frame(type_name):
    """
    Register an attrs class as the decoded form of frames of C{type_name}.
    """

    def register(cls):
        cls = attr.s(frozen=True, slots=True)(cls)
        cls.TYPE = type_name
        FRAME_TYPES[type_name] = cls
        return cls

    return register


# -- inbound frames ----------------------------------------------------------


@frame("hello")
class Hello:
    meshId = field(_identifier)
    memberId = field(_identifier)
    pubkey = field(_text(MAX_ID_LENGTH))
    signature = field(_text(256))
    sessionId = field(_text(MAX_ID_LENGTH, 1))
    # A missing or non-integer timestamp is a clock problem for the caller
    # (timestamp_skew), checked by the broker, not a malformed frame.
    timestamp = field(_anything, None)
    pid = field(_integer(0, 2**31 - 1), 0)
    cwd = field(_text(MAX_PATH_LENGTH), "")
    displayName = field(_name, None)
    sessionPubkey = field(_anything, None)
    sessionSignature = field(_text(256), None)
    claudeSessionId = field(_text(MAX_ID_LENGTH), None)
    hostname = field(_text(255), None)
    peerType = field(_choice("ai", "human", "connector"), None)
    channel = field(_text(64), None)
    model = field(_text(128), None)
    groups = field(_groups, ())
    receive = field(_boolean, True)
    # A watching session (claudemesh ui): presence and status events, its own
    # session-key messages, nothing meant for its member (docs/protocol.md).
    watch = field(_boolean, False)
    # false: receives, but is no presence (no events, not listed to others).
    presence = field(_boolean, True)
    _reqId = field(_REQ_ID, None)


@frame("send")
class Send:
    targetSpec = field(_text(256, 1))
    nonce = field(_text(64, 1))
    ciphertext = field(_text(2**31, 0))
    priority = field(_choice(*PRIORITIES), "next")
    id = field(_text(MAX_ID_LENGTH), None)
    # The mesh key epoch a broadcast or group message is sealed under
    # (absent: 0, the invite link's key); ignored for direct messages.
    keyEpoch = field(_integer(0), 0)
    _reqId = field(_REQ_ID, None)


@frame("client_ack")
class ClientAck:
    messageId = field(_identifier)
    _reqId = field(_REQ_ID, None)


@frame("set_status")
class SetStatus:
    status = field(_choice(*STATUSES))
    source = field(_choice(*WS_STATUS_SOURCES), "manual")
    sessionId = field(_text(MAX_ID_LENGTH, 1), None)
    all = field(_boolean, False)
    _reqId = field(_REQ_ID, None)


@frame("set_summary")
class SetSummary:
    summary = field(_text(MAX_SUMMARY_LENGTH))
    sessionId = field(_text(MAX_ID_LENGTH, 1), None)
    all = field(_boolean, False)
    _reqId = field(_REQ_ID, None)


@frame("list_peers")
class ListPeers:
    # Where the previous page ended (its reply's nextCursor).
    cursor = field(_text(MAX_CURSOR_LENGTH), None)
    _reqId = field(_REQ_ID, None)


@frame("join_group")
class JoinGroup:
    name = field(_group)
    role = field(_text(MAX_NAME_LENGTH), None)
    sessionId = field(_text(MAX_ID_LENGTH, 1), None)
    all = field(_boolean, False)
    _reqId = field(_REQ_ID, None)


@frame("leave_group")
class LeaveGroup:
    name = field(_group)
    sessionId = field(_text(MAX_ID_LENGTH, 1), None)
    all = field(_boolean, False)
    _reqId = field(_REQ_ID, None)


@frame("message_status")
class MessageStatus:
    messageId = field(_identifier)
    # Where the previous page ended (its reply's nextCursor).
    cursor = field(_text(MAX_CURSOR_LENGTH), None)
    _reqId = field(_REQ_ID, None)


@frame("audit_query")
class AuditQuery:
    limit = field(_integer(1, 500), 50)
    offset = field(_integer(0), 0)
    eventType = field(_text(64), None)
    _reqId = field(_REQ_ID, None)


@frame("audit_verify")
class AuditVerify:
    _reqId = field(_REQ_ID, None)


def _wire_name(attribute):
    # attrs strips the leading underscore of private names in __init__; the
    # wire keeps it (`_reqId`).
    return attribute.name


# A JSON escape of a UTF-16 surrogate: only frames holding one are checked
# for an unpaired one (pairs, as ASCII-only encoders write emoji, are fine).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def has_lone_surrogate(value):
    """
    Whether a decoded JSON value holds text with an unpaired UTF-16
    surrogate (JSON allows the escape C{"\\ud800"}). Such text cannot be
    encoded as UTF-8: echoed in a reply, pushed or stored as a name it would
    break every frame that carries it, so it is refused as malformed wherever
    it comes in.
    """
    try:
        if isinstance(value, str):
            value.encode("utf-8")
            return False
        if isinstance(value, dict):
            return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
        if isinstance(value, list):
            return any(has_lone_surrogate(v) for v in value)
    except UnicodeEncodeError:
        return True
    except RecursionError:
        return True
    return False


def decode(text, max_bytes=None):
    """
    Parse and validate one text frame.

    @return: an instance of the registered class for its C{type}.
    @raise Refusal: C{malformed} (naming the field) or C{unknown_type}.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise Refusal("malformed", "frame is not valid JSON") from None
    if _SURROGATE_ESCAPE.search(text) and has_lone_surrogate(obj):
        # Checked before anything is echoed (the _reqId could hold one).
        raise Refusal("malformed", "frame holds an unpaired UTF-16 surrogate escape")
    if not isinstance(obj, dict):
        raise Refusal("malformed", "frame must be a JSON object")
    req_id = obj.get("_reqId")
    if not (isinstance(req_id, str) and len(req_id) <= MAX_ID_LENGTH and not has_nul(req_id)):
        req_id = None
    type_name = obj.get("type")
    cls = FRAME_TYPES.get(type_name) if isinstance(type_name, str) else None
    send_id = obj.get("id") if type_name == "send" else None
    if not (isinstance(send_id, str) and len(send_id) <= MAX_ID_LENGTH
            and not has_nul(send_id)):
        send_id = None
    if cls is None:
        if not isinstance(type_name, str):
            raise Refusal("malformed", "field 'type' must be a string", req_id=req_id)
        raise Refusal(
            "unknown_type", "unknown frame type %r" % (type_name[:64],), req_id=req_id
        )
    values = {}
    for attribute in attr.fields(cls):
        wire = _wire_name(attribute)
        raw = obj.get(wire, _MISSING)
        if raw is _MISSING or raw is None:
            if attribute.default is attr.NOTHING:
                raise Refusal(
                    "malformed", "field %r is required" % (wire,), req_id=req_id,
                    send_id=send_id)
            continue
        try:
            value = attribute.metadata["check"](raw)
        except _Bad as e:
            raise Refusal(
                "malformed", "field %r %s" % (wire, e.args[0]), req_id=req_id,
                send_id=send_id) from None
        values[wire.lstrip("_")] = value
    return cls(**values)


# -- membership and moderation (docs/membership.md) ---------------------------

MAX_INVITE_TOKEN = 4096
MAX_TARGET_LENGTH = 256


@frame("join")
class Join:
    invite = field(_text(MAX_INVITE_TOKEN, 1))
    pubkey = field(_text(MAX_ID_LENGTH))
    displayName = field(_name)
    timestamp = field(_integer(0))
    signature = field(_text(256))
    _reqId = field(_REQ_ID, None)


@frame("create_invite")
class CreateInvite:
    role = field(_choice("admin", "member"), "member")
    maxUses = field(_integer(1, 10_000), 1)
    # Seconds; at most a year.
    expiresIn = field(_integer(60, 366 * 24 * 3600), 7 * 24 * 3600)
    _reqId = field(_REQ_ID, None)


@frame("list_invites")
class ListInvites:
    # Where the previous page ended (its reply's nextCursor).
    cursor = field(_text(MAX_CURSOR_LENGTH), None)
    _reqId = field(_REQ_ID, None)


@frame("revoke_invite")
class RevokeInvite:
    inviteId = field(_identifier)
    _reqId = field(_REQ_ID, None)


@frame("set_role")
class SetRole:
    target = field(_text(MAX_TARGET_LENGTH, 1))
    role = field(_choice(*ROLES))
    _reqId = field(_REQ_ID, None)


@frame("leave")
class Leave:
    _reqId = field(_REQ_ID, None)


@frame("list_members")
class ListMembers:
    # Where the previous page ended (its reply's nextCursor).
    cursor = field(_text(MAX_CURSOR_LENGTH), None)
    _reqId = field(_REQ_ID, None)


@attr.s(frozen=True, slots=True)
class _Selection:
    """
    C{disconnect} and C{kick} take exactly one of C{target}, C{stale} (ms of
    silence) or C{all}.
    """

    target = field(_text(MAX_TARGET_LENGTH, 1), None)
    stale = field(_integer(1), None)
    all = field(_boolean, False)
    _reqId = field(_REQ_ID, None)

    def __attrs_post_init__(self):
        chosen = [self.target is not None, self.stale is not None, bool(self.all)]
        if sum(chosen) != 1:
            raise Refusal(
                "malformed", "exactly one of fields 'target', 'stale', 'all' is required",
                req_id=self._reqId)


@frame("disconnect")
class Disconnect(_Selection):
    pass


@frame("kick")
class Kick(_Selection):
    pass


@frame("ban")
class Ban:
    target = field(_text(MAX_TARGET_LENGTH, 1))
    _reqId = field(_REQ_ID, None)


@frame("unban")
class Unban:
    target = field(_text(MAX_TARGET_LENGTH, 1))
    _reqId = field(_REQ_ID, None)


@frame("list_bans")
class ListBans:
    # Where the previous page ended (its reply's nextCursor).
    cursor = field(_text(MAX_CURSOR_LENGTH), None)
    _reqId = field(_REQ_ID, None)


# -- mesh key epochs (issue 17, docs/protocol.md "Mesh key epochs") -----------

# A sealed copy of a mesh key is opaque to the broker: standard base64 of at
# most this many bytes (today's copies are 88: nonce, MAC, binding, key).
MAX_SEALED_KEY_BYTES = 256
MIN_SEALED_KEY_BYTES = 40
MAX_REASON_LENGTH = 200
_BASE64 = re.compile(r"\A[A-Za-z0-9+/]*={0,2}\Z")


def _sealed_key(value):
    if not isinstance(value, str) or len(value) > 4 * (MAX_SEALED_KEY_BYTES // 3 + 1):
        raise _Bad("must be base64 of at most %d bytes" % (MAX_SEALED_KEY_BYTES,))
    if len(value) % 4 or not _BASE64.match(value):
        raise _Bad("must be standard padded base64")
    size = len(value) // 4 * 3 - value.count("=")
    if not MIN_SEALED_KEY_BYTES <= size <= MAX_SEALED_KEY_BYTES:
        raise _Bad("must hold %d to %d bytes" % (MIN_SEALED_KEY_BYTES, MAX_SEALED_KEY_BYTES))
    return value


def _sealed_keys(value):
    """
    C{[{memberPubkey, sealedKey}]}: one sealed copy per member key, each
    member at most once.
    """
    if not isinstance(value, list):
        raise _Bad("must be a list of {memberPubkey, sealedKey}")
    kept = []
    seen = set()
    for item in value:
        if not isinstance(item, dict):
            raise _Bad("must hold objects {memberPubkey, sealedKey}")
        pubkey = item.get("memberPubkey")
        if not is_pubkey(pubkey):
            raise _Bad("memberPubkey must be 64 lowercase hex characters")
        if pubkey in seen:
            raise _Bad("names member %s… twice" % (pubkey[:16],))
        seen.add(pubkey)
        try:
            sealed = _sealed_key(item.get("sealedKey"))
        except _Bad as e:
            raise _Bad("sealedKey %s" % (e.args[0],)) from None
        kept.append((pubkey, sealed))
    return tuple(kept)


@frame("rotate_mesh_key")
class RotateMeshKey:
    """
    Upload one part of a new mesh key epoch: a sealed copy for each current
    member; C{more} when further parts follow. The last part commits.
    """

    epoch = field(_integer(1))
    sealedKeys = field(_sealed_keys)
    reason = field(_text(MAX_REASON_LENGTH, 1), None)
    more = field(_boolean, False)
    _reqId = field(_REQ_ID, None)


@frame("share_mesh_key")
class ShareMeshKey:
    """
    Sealed copies of the current epoch's key for members who have none.
    """

    epoch = field(_integer(1))
    sealedKeys = field(_sealed_keys)
    _reqId = field(_REQ_ID, None)


@frame("get_mesh_key")
class GetMeshKey:
    """
    The caller's own sealed copy of the key of C{epoch}.
    """

    epoch = field(_integer(0))
    _reqId = field(_REQ_ID, None)


@frame("mesh_key_status")
class MeshKeyStatus:
    """
    The mesh's current key epoch, and for owners and admins who left since
    it was rotated (what C{hello_ack} says, asked again by a long-lived
    client).
    """

    _reqId = field(_REQ_ID, None)
