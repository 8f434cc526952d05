"""
Message encryption for targets, opening pushes, invite tokens and links,
and target resolution: the client-side rules of DESIGN sections 4.1 and 4.2,
without I/O.
"""

import base64
import binascii
import json
import re
import urllib.parse

import attr

from claudemesh import crypto, protocol

LINK_PREFIX = "claudemesh://join/"
MIN_PREFIX = 8
_HEX = re.compile(r"\A[0-9a-f]+\Z")


class InviteError(Exception):
    """
    An invite link or token that cannot be used; the message is for the user.
    """


class TargetError(Exception):
    """
    A C{send}/moderation target that does not name exactly one member.

    @ivar code: C{not_found} or C{ambiguous}.
    @ivar candidates: for C{ambiguous}, C{[{name, pubkey}]}.
    """

    def __init__(self, code, message, candidates=()):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.candidates = list(candidates)


# -- URLs -----------------------------------------------------------------------


def http_base(broker_url):
    """
    The HTTP base of a broker's WebSocket URL: ws→http, wss→https, no path.

    @raise ValueError: not a C{ws://} or C{wss://} URL.
    """
    parts = urllib.parse.urlsplit(broker_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError("a broker URL looks like ws://host:port/ws or wss://host/ws")
    return "%s://%s" % (scheme, parts.netloc)


def check_broker_url(broker_url):
    """
    Return C{broker_url} if it is a usable WebSocket URL, else raise
    L{ValueError} with a message for the user.
    """
    http_base(broker_url)
    parts = urllib.parse.urlsplit(broker_url)
    try:
        parts.port
    except ValueError:
        raise ValueError("the broker URL %r has a bad port" % (broker_url,)) from None
    return broker_url


# -- invites ----------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))


def make_invite(inviter, mesh_id, mesh_name, invite_id, role, expires_at, broker_url):
    """
    The signed invite object of DESIGN section 4.1.

    @param inviter: the inviter's L{crypto.Identity} (owner or admin).
    """
    signature = inviter.sign(crypto.invite_string(
        mesh_id, invite_id, role, expires_at, inviter.pubkey, broker_url))
    return {"v": 1, "meshId": mesh_id, "meshName": mesh_name, "inviteId": invite_id,
            "role": role, "expiresAt": expires_at, "inviterPubkey": inviter.pubkey,
            "brokerUrl": broker_url, "signature": signature}


def invite_token(invite) -> str:
    return _b64url(json.dumps(invite, separators=(",", ":")).encode("utf-8"))


def key_fragment(mesh_key: bytes, key_epoch=0) -> str:
    """
    What follows C{#} in an invite link: the mesh key, and after a rotation
    C{.<epoch>} (issue 17); epoch 0 is written bare, as links always were.
    """
    text = crypto.encode_mesh_key(mesh_key)
    return text if not key_epoch else "%s.%d" % (text, key_epoch)


def parse_key_fragment(text):
    """
    C{(mesh key, epoch)} of a link's fragment.

    @raise ValueError: not a key, or a bad epoch.
    """
    key_text, dot, epoch_text = text.partition(".")
    epoch = 0
    if dot:
        if not (epoch_text.isdigit() and epoch_text.isascii() and len(epoch_text) <= 15):
            raise ValueError("bad key epoch %r" % (epoch_text[:20],))
        epoch = int(epoch_text)
    return crypto.decode_mesh_key(key_text), epoch


def invite_link(invite, mesh_key: bytes, key_epoch=0) -> str:
    return LINK_PREFIX + invite_token(invite) + "#" + key_fragment(mesh_key, key_epoch)


@attr.s(frozen=True, auto_attribs=True)
class ParsedInvite:
    token: str
    invite: dict
    mesh_key: bytes | None
    # The key epoch of mesh_key (issue 17).
    mesh_key_epoch: int = 0


def parse_invite_link(link, now_seconds=None):
    """
    Read a link C{claudemesh://join/<token>#<mesh key>} (or a bare token, or
    C{<token>#<key>}) and check its shape, signature and expiry locally.

    @raise InviteError: with the reason.
    """
    text = link.strip()
    if text.startswith(LINK_PREFIX):
        text = text[len(LINK_PREFIX):]
    elif "://" in text:
        raise InviteError("not a claudemesh invite link (they start with %s)" % (LINK_PREFIX,))
    token, _, key_text = text.partition("#")
    token = token.rstrip("/")
    if not token or not re.match(r"\A[A-Za-z0-9_-]+\Z", token):
        raise InviteError("the invite link has no valid token")
    try:
        invite = json.loads(_unb64url(token).decode("utf-8"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InviteError("the invite token cannot be decoded (truncated link?)") from None
    if not isinstance(invite, dict) or invite.get("v") != 1:
        raise InviteError("the invite token is not a version 1 claudemesh invite")
    for key in ("meshId", "meshName", "inviteId", "role", "inviterPubkey", "brokerUrl",
                "signature"):
        if not isinstance(invite.get(key), str) or not invite.get(key):
            raise InviteError("the invite lacks the field %r" % (key,))
    expires_at = invite.get("expiresAt")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise InviteError("the invite lacks the field 'expiresAt'")
    signed = crypto.invite_string(invite["meshId"], invite["inviteId"], invite["role"],
                                  expires_at, invite["inviterPubkey"], invite["brokerUrl"])
    if not crypto.verify(invite["inviterPubkey"], signed, invite["signature"]):
        raise InviteError("the invite signature is invalid (was the link altered?)")
    if now_seconds is not None and expires_at < now_seconds:
        raise InviteError("this invite expired")
    mesh_key, epoch = None, 0
    if key_text:
        try:
            mesh_key, epoch = parse_key_fragment(key_text)
        except (ValueError, binascii.Error):
            raise InviteError("the mesh key after '#' in the link is malformed") from None
    return ParsedInvite(token, invite, mesh_key, epoch)


def join_request(token, identity, display_name, timestamp):
    """
    The body of the C{join} frame and of C{POST /join}.
    """
    invite = json.loads(_unb64url(token).decode("utf-8"))
    signature = identity.sign(crypto.join_string(
        invite["inviteId"], identity.pubkey, display_name, timestamp))
    return {"invite": token, "pubkey": identity.pubkey, "displayName": display_name,
            "timestamp": timestamp, "signature": signature}


def create_mesh_request(owner, name, display_name, timestamp):
    """
    The body of C{POST /meshes}.
    """
    return {"name": name, "ownerPubkey": owner.pubkey, "displayName": display_name,
            "timestamp": timestamp,
            "signature": owner.sign(crypto.create_mesh_string(name, owner.pubkey, timestamp))}


# -- encryption -------------------------------------------------------------------


is_broadcast = protocol.is_broadcast


def seal(target_spec, plaintext: bytes, sender, mesh_key):
    """
    Encrypt for C{target_spec}: secretbox under the mesh key for C{*} and
    C{@…}, else crypto_box from C{sender} (the key the client says hello
    with: its session key if it has one) to the target key.

    @return: C{(nonce, ciphertext)}, standard base64.
    """
    if is_broadcast(target_spec):
        if mesh_key is None:
            raise ValueError("this mesh has no mesh key in the config; broadcasts need one")
        return crypto.encrypt_broadcast(mesh_key, plaintext)
    return crypto.encrypt_direct(sender, target_spec, plaintext)


@attr.s(frozen=True, auto_attribs=True)
class Inbound:
    """
    A message push, opened (or not) for the application.

    @ivar text: the plaintext as text, or C{None} when it could not be opened.
    @ivar error: why it could not be opened, else C{None}.
    """

    messageId: str
    meshId: str
    senderPubkey: str
    senderMemberPubkey: str
    targetSpec: str
    priority: str
    createdAt: str
    seq: int | None
    text: str | None
    error: str | None = None

    @property
    def kind(self):
        return "broadcast" if is_broadcast(self.targetSpec) else "direct"

    def to_json(self):
        return attr.asdict(self)


def push_key_epoch(push):
    """
    The mesh key epoch a broadcast push is sealed under (C{keyEpoch}; 0
    when absent, as from a broker before issue 17), or C{None} when it is
    not a valid one.
    """
    epoch = push.get("keyEpoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return None
    return epoch


def never_received(epoch):
    if epoch == 0:
        return "no mesh key for this mesh in the config (epoch 0, the invite link's key)"
    return "sealed under key epoch %d, which this member never received" % (epoch,)


def open_push(push, member, session=None, mesh_key=None, key_of_epoch=None):
    """
    Open a message push with the secret its C{targetSpec} names: the session
    key, the member key, or the mesh key — of the push's C{keyEpoch} when
    C{key_of_epoch} (epoch → key or C{None}) is given, else C{mesh_key}. A
    failure is reported on that message only (C{error} set, C{text} C{None}).
    """
    target = push.get("targetSpec") or ""
    text, error = None, None
    try:
        if is_broadcast(target):
            if key_of_epoch is not None:
                epoch = push_key_epoch(push)
                if epoch is None:
                    raise crypto.DecryptionFailed("the push names no valid key epoch")
                mesh_key = key_of_epoch(epoch)
                if mesh_key is None:
                    raise crypto.DecryptionFailed(never_received(epoch))
            elif mesh_key is None:
                raise crypto.DecryptionFailed("no mesh key for this mesh in the config")
            raw = crypto.decrypt_broadcast(mesh_key, push.get("nonce", ""),
                                           push.get("ciphertext", ""))
        else:
            if session is not None and target == session.pubkey:
                secret = session
            elif target == member.pubkey:
                secret = member
            else:
                raise crypto.DecryptionFailed("addressed to a key this client does not hold")
            raw = crypto.decrypt_direct(secret, push.get("senderPubkey", ""),
                                        push.get("nonce", ""), push.get("ciphertext", ""))
        text = raw.decode("utf-8", errors="replace")
    except crypto.DecryptionFailed as e:
        error = "cannot decrypt: %s" % (e,) if str(e) else "cannot decrypt"
    return Inbound(
        messageId=push.get("messageId", ""), meshId=push.get("meshId", ""),
        senderPubkey=push.get("senderPubkey", ""),
        senderMemberPubkey=push.get("senderMemberPubkey", ""), targetSpec=target,
        priority=push.get("priority", ""), createdAt=push.get("createdAt", ""),
        seq=push.get("seq"), text=text, error=error)


# -- targets ----------------------------------------------------------------------


def resolve_target(spec, members=(), peers=()):
    """
    Turn what a user typed into a C{targetSpec}.

    C{*}, C{@all}, C{@group} and a full 64-hex key are used as they are. A
    display name (case-insensitive) or a hex prefix of at least 8 characters
    is matched against C{members} (C{members_list} rows: C{name,
    memberPubkey}) and C{peers} (C{peers_list} rows: C{displayName, pubkey,
    memberPubkey}). A name or member-key prefix resolves to the member key; a
    prefix of a session key alone resolves to that session key. Matches on
    more than one member are ambiguous.

    @raise TargetError: C{not_found} or C{ambiguous}.
    """
    if is_broadcast(spec):
        return spec
    lowered = spec.lower()
    if crypto.is_pubkey(lowered):
        return lowered
    by_member = {}  # member pubkey -> name
    sessions = {}  # session pubkey -> (member pubkey, name)
    for m in members:
        if m.get("memberPubkey"):
            by_member[m["memberPubkey"]] = m.get("name") or m["memberPubkey"][:8]
    for p in peers:
        member_key = p.get("memberPubkey") or p.get("pubkey")
        if not member_key:
            continue
        by_member.setdefault(member_key, p.get("displayName") or member_key[:8])
        if p.get("pubkey") and p["pubkey"] != member_key:
            sessions[p["pubkey"]] = (member_key, p.get("displayName") or "")
    matches = {}
    for key, name in by_member.items():
        if name.lower() == lowered:
            matches[key] = (key, name)
    for p in peers:
        member_key = p.get("memberPubkey") or p.get("pubkey")
        if (p.get("displayName") or "").lower() == lowered and member_key:
            matches[member_key] = (member_key, by_member.get(member_key, p["displayName"]))
    if not matches and len(lowered) >= MIN_PREFIX and _HEX.match(lowered):
        for key, name in by_member.items():
            if key.startswith(lowered):
                matches[key] = (key, name)
        for key, (member_key, name) in sessions.items():
            if key.startswith(lowered) and member_key not in matches:
                matches[member_key] = (key, name or by_member.get(member_key, ""))
    if not matches:
        raise TargetError("not_found", 'No member matches "%s".' % (spec,))
    if len(matches) > 1:
        candidates = [{"name": name, "pubkey": member_key}
                      for member_key, (_, name) in sorted(matches.items())]
        raise TargetError(
            "ambiguous", '"%s" matches several members: %s' % (
                spec, ", ".join("%s (%s…)" % (c["name"], c["pubkey"][:12]) for c in candidates)),
            candidates)
    return next(iter(matches.values()))[0]
