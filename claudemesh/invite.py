"""
Invite tokens and links (DESIGN section 4.1).

An invite is the JSON object C{{v:1, meshId, meshName, inviteId, role,
expiresAt, inviterPubkey, brokerUrl, signature}}; its token is base64url
without padding of that JSON; the link is
C{claudemesh://join/<token>#<base64url(mesh key)>}. The part after C{#} is
never sent to the broker.
"""

import base64
import json

from claudemesh import crypto

LINK_PREFIX = "claudemesh://join/"
INVITE_FIELDS = ("v", "meshId", "meshName", "inviteId", "role", "expiresAt",
                 "inviterPubkey", "brokerUrl", "signature")


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


def sign_invite(inviter, mesh_id, mesh_name, invite_id, role, expires_at, broker_url):
    """
    The signed invite object, by C{inviter} (a L{crypto.Identity}).
    """
    signature = inviter.sign(crypto.invite_string(
        mesh_id, invite_id, role, expires_at, inviter.pubkey, broker_url))
    return {"v": 1, "meshId": mesh_id, "meshName": mesh_name, "inviteId": invite_id,
            "role": role, "expiresAt": expires_at, "inviterPubkey": inviter.pubkey,
            "brokerUrl": broker_url, "signature": signature}


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
    return invite


def verify_invite(invite: dict) -> bool:
    """
    Does the invite's signature verify with its inviter key?
    """
    return crypto.is_pubkey(invite["inviterPubkey"]) and crypto.is_signature(
        invite["signature"]) and crypto.verify(
        invite["inviterPubkey"],
        crypto.invite_string(invite["meshId"], invite["inviteId"], invite["role"],
                             invite["expiresAt"], invite["inviterPubkey"], invite["brokerUrl"]),
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
    decode_token(token)
    return token, mesh_key
