"""
Invite tokens and links (docs/protocol.md, signed strings), shared by the broker and the
client.

An invite is the JSON object C{{v:1, meshId, meshName, inviteId, role,
expiresAt, inviterPubkey, brokerUrl, meshKeyCheck?, signature}}; its token is
base64url without padding of that JSON; the link is
C{claudemesh://join/<token>#<base64url(mesh key)>}. The part after C{#} is
never sent to the broker.

C{meshKeyCheck} (since 0.2, optional) is L{crypto.mesh_key_check} of the mesh
key: the joiner compares it with the key after C{#}, so a mistyped key is
refused at C{join} instead of failing every broadcast later. When present it
is signed too (L{crypto.invite_string}); invites without it keep working.

The compact form, C{claudemesh://join/c1.<base64url(packed)>#<key>}, carries
the same fields in binary (L{pack_token}): about half as long, so its QR
code fits an 80-column terminal. C{join} turns it back into the JSON token
(L{unpack_token}) before anything reaches the broker, which only ever sees
JSON tokens.
"""

import base64
import json
import re
import struct

from claudemesh import crypto

LINK_PREFIX = "claudemesh://join/"
COMPACT_PREFIX = "c1."
INVITE_FIELDS = ("v", "meshId", "meshName", "inviteId", "role", "expiresAt",
                 "inviterPubkey", "brokerUrl", "signature")
_ID32 = re.compile(r"\A[0-9a-f]{32}\Z")
_ROLES = ("member", "admin")


class BadInvite(ValueError):
    """
    Not an invite token or link we can read.
    """


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise BadInvite("not base64url: %s" % (e,)) from None


def sign_invite(inviter, mesh_id, mesh_name, invite_id, role, expires_at, broker_url,
                mesh_key_check=None):
    """
    The signed invite object, by C{inviter} (a L{crypto.Identity}); with a
    C{meshKeyCheck} when C{mesh_key_check} is given.
    """
    signature = inviter.sign(crypto.invite_string(
        mesh_id, invite_id, role, expires_at, inviter.pubkey, broker_url, mesh_key_check))
    invite = {"v": 1, "meshId": mesh_id, "meshName": mesh_name, "inviteId": invite_id,
              "role": role, "expiresAt": expires_at, "inviterPubkey": inviter.pubkey,
              "brokerUrl": broker_url, "signature": signature}
    if mesh_key_check is not None:
        invite["meshKeyCheck"] = mesh_key_check
    return invite


def encode_token(invite: dict) -> str:
    return _b64url(json.dumps(invite, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def decode_token(token: str) -> dict:
    """
    The invite object of a token, with every field of the right type.

    @raise BadInvite: when it is not one.
    """
    try:
        invite = json.loads(_unb64url(token).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadInvite("the invite token is not base64url JSON") from None
    if not isinstance(invite, dict) or invite.get("v") != 1:
        raise BadInvite("not a version 1 invite")
    for name in INVITE_FIELDS:
        value = invite.get(name)
        wanted = int if name in ("v", "expiresAt") else str
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise BadInvite("invite field %r is missing or of the wrong type" % (name,))
    if "meshKeyCheck" in invite and not crypto.is_mesh_key_check(invite["meshKeyCheck"]):
        raise BadInvite("invite field 'meshKeyCheck' must be 32 lowercase hex characters")
    return invite


def verify_invite(invite: dict) -> bool:
    """
    Does the invite's signature verify with its inviter key?
    """
    return crypto.is_pubkey(invite["inviterPubkey"]) and crypto.is_signature(
        invite["signature"]) and crypto.verify(
        invite["inviterPubkey"],
        crypto.invite_string(invite["meshId"], invite["inviteId"], invite["role"],
                             invite["expiresAt"], invite["inviterPubkey"], invite["brokerUrl"],
                             invite.get("meshKeyCheck")),
        invite["signature"])


def make_link(token: str, mesh_key: bytes) -> str:
    return LINK_PREFIX + token + "#" + crypto.encode_mesh_key(mesh_key)


def parse_link(link: str):
    """
    C{(token, mesh key bytes)} of an invite link.

    @raise BadInvite: when it is not one.
    """
    link = link.strip()
    if not link.startswith(LINK_PREFIX) or "#" not in link:
        raise BadInvite("an invite link looks like claudemesh://join/<token>#<key>")
    token, _, key = link[len(LINK_PREFIX):].partition("#")
    try:
        mesh_key = crypto.decode_mesh_key(key)
    except (ValueError, UnicodeEncodeError):
        raise BadInvite("the mesh key after '#' is not 32 bytes of base64url") from None
    if token.startswith(COMPACT_PREFIX):
        token = encode_token(unpack_token(token))
    decode_token(token)
    return token, mesh_key


# -- the compact form ----------------------------------------------------------
#
# packed = 0x01 (format) | flags (bit 0: meshKeyCheck present) | role (0 member,
#          1 admin) | meshId (16) | inviteId (16) | inviterPubkey (32) |
#          signature (64) | meshKeyCheck (16, when flagged) | expiresAt (u64) |
#          len(meshName) (u16) meshName | len(brokerUrl) (u16) brokerUrl
# (UTF-8, big-endian). "v" is 1, implied.

_FORMAT = 1
_HEAD = struct.Struct(">BBB16s16s32s64s")


def can_pack(invite: dict) -> bool:
    """
    Whether L{pack_token} can carry this invite (our own ids and keys are
    always of the packable shape; a foreign one may not be).
    """
    return (_ID32.match(invite.get("meshId", "")) is not None
            and _ID32.match(invite.get("inviteId", "")) is not None
            and invite.get("role") in _ROLES and crypto.is_pubkey(invite.get("inviterPubkey"))
            and crypto.is_signature(invite.get("signature"))
            and ("meshKeyCheck" not in invite
                 or crypto.is_mesh_key_check(invite["meshKeyCheck"]))
            and isinstance(invite.get("expiresAt"), int)
            and 0 <= invite["expiresAt"] < 2**64
            and len(invite.get("meshName", "").encode("utf-8")) < 2**16
            and len(invite.get("brokerUrl", "").encode("utf-8")) < 2**16)


def pack_token(invite: dict) -> str:
    """
    The compact token (C{c1.…}) of an invite that L{can_pack}.
    """
    check = invite.get("meshKeyCheck")
    head = _HEAD.pack(
        _FORMAT, 1 if check else 0, _ROLES.index(invite["role"]),
        bytes.fromhex(invite["meshId"]), bytes.fromhex(invite["inviteId"]),
        bytes.fromhex(invite["inviterPubkey"]), bytes.fromhex(invite["signature"]))
    name = invite["meshName"].encode("utf-8")
    url = invite["brokerUrl"].encode("utf-8")
    body = (head + (bytes.fromhex(check) if check else b"")
            + struct.pack(">QH", invite["expiresAt"], len(name)) + name
            + struct.pack(">H", len(url)) + url)
    return COMPACT_PREFIX + _b64url(body)


def unpack_token(token: str) -> dict:
    """
    The invite object of a compact token, the same one its JSON token holds.

    @raise BadInvite: when it is not one.
    """
    if not token.startswith(COMPACT_PREFIX):
        raise BadInvite("not a compact invite token")
    data = _unb64url(token[len(COMPACT_PREFIX):])
    try:
        fmt, flags, role, mesh_id, invite_id, inviter, signature = _HEAD.unpack_from(data)
        offset = _HEAD.size
        if fmt != _FORMAT or role >= len(_ROLES) or flags not in (0, 1):
            raise BadInvite("not a compact invite of a known format")
        check = None
        if flags:
            check = data[offset:offset + 16].hex()
            offset += 16
        expires_at, name_length = struct.unpack_from(">QH", data, offset)
        offset += 10
        name = data[offset:offset + name_length].decode("utf-8")
        offset += name_length
        (url_length,) = struct.unpack_from(">H", data, offset)
        offset += 2
        url = data[offset:offset + url_length].decode("utf-8")
        if offset + url_length != len(data) or len(name.encode("utf-8")) != name_length:
            raise BadInvite("the compact invite token is truncated")
    except (struct.error, UnicodeDecodeError):
        raise BadInvite("the compact invite token is truncated or damaged") from None
    invite = {"v": 1, "meshId": mesh_id.hex(), "meshName": name, "inviteId": invite_id.hex(),
              "role": _ROLES[role], "expiresAt": expires_at, "inviterPubkey": inviter.hex(),
              "brokerUrl": url, "signature": signature.hex()}
    if check is not None:
        invite["meshKeyCheck"] = check
    return invite
