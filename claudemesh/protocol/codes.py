"""
The protocol's constants and shared rules: close codes and reasons, limits,
the shapes of names, ids and groups, key prefixes, the removal message, and
L{Refusal}, the one error every part raises and every reply carries.

The client imports these too, so both ends agree on every code and string.
"""

import json
import re

# -- close codes (docs/protocol.md, close codes) --------------------------------------

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_KICKED = 4001
CLOSE_BANNED = 4002
CLOSE_SLOW_CONSUMER = 4003

REASON_SESSION_REPLACED = "session_replaced"
REASON_DISCONNECTED = "disconnected"
REASON_KICKED = "kicked"
REASON_BANNED = "banned"
REASON_SHUTTING_DOWN = "shutting down"
REASON_FLOOD = "flood"

# -- priorities, statuses ---------------------------------------------------

PRIORITIES = ("now", "next", "low")
STATUSES = ("idle", "working", "dnd")
# set_status over the WebSocket may claim these sources; "hook" only arrives
# through the authenticated /hook/set-status route.
WS_STATUS_SOURCES = ("manual", "jsonl")
ROLES = ("owner", "admin", "member")

# How much larger than the send frame that carried it a push may be: the
# push repeats targetSpec, priority, nonce and ciphertext (each encoded no
# longer than the sender had to encode it) and adds messageId, meshId (an id,
# at most 128 characters), senderPubkey, senderMemberPubkey, createdAt and
# seq: under 500 bytes. The broker's outbound frame limit is its inbound
# limit plus this, so every send it accepts can be pushed (issue 11).
PUSH_ENVELOPE_BYTES = 1024

MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 64
MAX_SUMMARY_LENGTH = 1024
MAX_PATH_LENGTH = 4096
MAX_GROUP_LENGTH = 128
# A page cursor (claudemesh.broker.pages): opaque to clients.
MAX_CURSOR_LENGTH = 256
# Groups one session may hold, from its hello and join_group alike.
MAX_GROUPS = 64
# Integers on the wire stay within what every JSON parser and both
# databases hold exactly (issue 11: an offset of 10^30 overflowed SQLite).
MAX_SAFE_INTEGER = 2**53 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The shape of ids the broker makes (mesh, member, message, invite ids): no
# NUL, no '|' (the separator of signed strings), no '/' (which every
# claudemesh-…/1 domain tag holds), so no other signed string parses as a
# hello (docs/protocol.md).
_ID = re.compile(r"\A[A-Za-z0-9_.:-]{1,128}\Z")
_GROUP = re.compile(r"\A[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*\Z")


class Refusal(Exception):
    """
    A frame or request the broker refuses; becomes C{error {code, message}}
    (with C{extra} fields such as C{candidates}), and, when C{close} is set,
    the close C{(code, reason)} that follows it.

    @ivar req_id: the frame's C{_reqId} when it could be read, so the error
        can be correlated.
    @ivar send_id: the frame's C{id} for a C{send}, echoed on its refusal.
    """

    def __init__(self, code, message, *, req_id=None, send_id=None, close=None, **extra):
        Exception.__init__(self, code, message)
        self.code = code
        self.message = message
        self.req_id = req_id
        self.send_id = send_id
        self.close = close
        self.extra = extra

    def frame(self, req_id=None):
        """
        The C{error} frame of this refusal, answering a frame whose
        C{_reqId} is C{req_id} (when this refusal does not know its own).
        """
        reply = error_frame(self.code, self.message, self.req_id or req_id, **self.extra)
        if self.send_id is not None:
            reply["id"] = self.send_id
        return reply


# What a client tells its user after close 4001.
KICKED_MESSAGE = "Kicked from this mesh. Run claudemesh to rejoin."


def revoked_message(mesh_name):
    """
    What a removed member is told, by the broker (C{error revoked}) and by its
    client (after close 4002).
    """
    return 'You\'ve been removed from "%s". Contact the mesh owner to rejoin.' % (mesh_name,)


def is_valid_name(value) -> bool:
    """
    Display and mesh names: 1-64 characters, no C{|}, no control characters.
    """
    return (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_NAME_LENGTH
        and "|" not in value
        and not _CONTROL.search(value)
    )


def is_broadcast(target_spec) -> bool:
    """
    Is a message to C{target_spec} sealed with the mesh key: C{*}, C{@all}
    or C{@group} (the rest are direct messages, sealed to one key)?
    """
    return target_spec == "*" or target_spec.startswith("@")


def is_valid_group(value) -> bool:
    return isinstance(value, str) and len(value) <= MAX_GROUP_LENGTH and bool(
        _GROUP.match(value)
    )


def has_nul(value) -> bool:
    """
    Whether text holds U+0000, which Postgres cannot store in a text column
    (and which no field of the protocol has a use for).
    """
    return "\x00" in value


def is_valid_id(value) -> bool:
    return isinstance(value, str) and _ID.match(value) is not None


def encode(message: dict) -> bytes:
    """
    Serialise an outbound frame once, compactly, as UTF-8.
    """
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def error_frame(code, message, req_id=None, **extra):
    reply = {"type": "error", "code": code, "message": message}
    reply.update(extra)
    if req_id is not None:
        reply["_reqId"] = req_id
    return reply


# Signed timestamps (hello, join, create mesh, hook) must be within this
# many milliseconds of the broker's clock.
SIGNED_SKEW_MS = 60_000

# Keys may be named by a hex prefix of at least this many characters.
MIN_KEY_PREFIX = 8
_HEX = re.compile(r"\A[0-9a-f]+\Z")


def key_matches(key, target) -> bool:
    """
    Does C{target} name C{key}: the whole key, or a lowercase hex prefix of
    at least L{MIN_KEY_PREFIX} characters?
    """
    if not key:
        return False
    return key == target or (len(target) >= MIN_KEY_PREFIX and _HEX.match(target) is not None
                             and key.startswith(target))
