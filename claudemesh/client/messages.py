"""
Message encryption for targets, opening pushes, invite tokens and links,
and target resolution: the client-side rules of docs/protocol.md (signed
strings, invites, delivery), without I/O.
"""

import binascii
import datetime
import difflib
import re
import urllib.parse

import attr

from claudemesh import crypto, protocol
from claudemesh import invite as invites

LINK_PREFIX = invites.LINK_PREFIX
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

URL_FORM = "ws://host:port/ws (or wss://host/ws behind TLS)"


def http_base(broker_url):
    """
    The HTTP base of a broker's WebSocket URL: ws→http, wss→https, no path.

    @raise ValueError: not a C{ws://} or C{wss://} URL.
    """
    parts = urllib.parse.urlsplit(broker_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError("a broker URL looks like " + URL_FORM)
    return "%s://%s" % (scheme, parts.netloc)


def normalise_broker_url(broker_url):
    """
    The canonical form of a broker URL, C{ws[s]://host[:port]/ws}: C{http}
    and C{https} become C{ws} and C{wss}, a missing path (or C{/}) becomes
    C{/ws}. Returns C{(url, changed)}.

    @raise ValueError: with a message for the user, for anything that is not
        a broker URL (another scheme, no host, a bad port, another path).
    """
    text = broker_url.strip()
    parts = urllib.parse.urlsplit(text)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("%r is not a broker URL; it looks like %s" % (broker_url, URL_FORM))
    try:
        parts.port
    except ValueError:
        raise ValueError("the broker URL %r has a bad port" % (broker_url,)) from None
    path = parts.path.rstrip("/")
    if path not in ("", "/ws"):
        raise ValueError("the broker's WebSocket path is /ws, not %r: use %s" % (
            parts.path, urllib.parse.urlunsplit((scheme, parts.netloc, "/ws", "", ""))))
    if parts.query or parts.fragment:
        raise ValueError("a broker URL has no query or fragment: use %s" % (
            urllib.parse.urlunsplit((scheme, parts.netloc, "/ws", "", "")),))
    url = urllib.parse.urlunsplit((scheme, parts.netloc, "/ws", "", ""))
    return url, url != broker_url


def check_broker_url(broker_url):
    """
    Return the canonical form of C{broker_url} (L{normalise_broker_url}),
    else raise L{ValueError} with a message for the user.
    """
    return normalise_broker_url(broker_url)[0]


# -- invites ----------------------------------------------------------------------

EXPIRED_HINT = "ask the mesh owner (or an admin) for a new invite link"


def make_invite(inviter, mesh_id, mesh_name, invite_id, role, expires_at, broker_url,
                mesh_key=None):
    """
    The signed invite object of docs/protocol.md, signed strings; with C{mesh_key}, it
    carries the key's check value (L{crypto.mesh_key_check}).

    @param inviter: the inviter's L{crypto.Identity} (owner or admin).
    """
    check = crypto.mesh_key_check(mesh_key, mesh_id) if mesh_key is not None else None
    return invites.sign_invite(inviter, mesh_id, mesh_name, invite_id, role, expires_at,
                               broker_url, check)


def invite_token(invite) -> str:
    return invites.encode_token(invite)


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


def compact_invite_link(invite, mesh_key: bytes, key_epoch=0):
    """
    The same invite in the compact form (for QR codes), or C{None} when
    this invite cannot be packed.
    """
    if not invites.can_pack(invite):
        return None
    return LINK_PREFIX + invites.pack_token(invite) + "#" + key_fragment(mesh_key, key_epoch)


@attr.s(frozen=True, auto_attribs=True)
class ParsedInvite:
    """
    @ivar token: the JSON token (a compact link is expanded), as the broker
        takes it.
    @ivar key_checked: C{True} when the mesh key matched the invite's check
        value, C{None} when there was nothing to check.
    """

    token: str
    invite: dict
    mesh_key: bytes | None
    # The key epoch of mesh_key (issue 17).
    mesh_key_epoch: int = 0
    key_checked: bool | None = None


def parse_invite_link(link, now_seconds=None):
    """
    Read a link C{claudemesh://join/<token>#<mesh key>} (or a bare token, or
    C{<token>#<key>}, or the compact C{c1.} form) and check its shape,
    signature, expiry and the mesh key's check value locally.

    @raise InviteError: with the reason and what to do.
    """
    text = link.strip()
    if text.startswith(LINK_PREFIX):
        text = text[len(LINK_PREFIX):]
    elif "://" in text:
        raise InviteError("not a claudemesh invite link (they start with %s)" % (LINK_PREFIX,))
    token, _, key_text = text.partition("#")
    token = token.rstrip("/")
    try:
        if token.startswith(invites.COMPACT_PREFIX):
            invite = invites.unpack_token(token)
            token = invites.encode_token(invite)
        elif not token or not re.match(r"\A[A-Za-z0-9_-]+\Z", token):
            raise InviteError("the invite link has no valid token; copy the whole link")
        invite = invites.decode_token(token)
    except invites.BadInvite as e:
        raise InviteError("the invite cannot be read (%s): was the link cut short? Copy "
                          "the whole link, or %s" % (e, EXPIRED_HINT)) from None
    if not invites.verify_invite(invite):
        raise InviteError("the invite signature is invalid (was the link altered?); "
                          + EXPIRED_HINT)
    if now_seconds is not None and invite["expiresAt"] < now_seconds:
        when = datetime.datetime.fromtimestamp(invite["expiresAt"], datetime.timezone.utc)
        raise InviteError("this invite expired on %s; %s"
                          % (when.strftime("%Y-%m-%d %H:%M UTC"), EXPIRED_HINT))
    mesh_key, epoch, checked = None, 0, None
    if key_text:
        try:
            mesh_key, epoch = parse_key_fragment(key_text)
        except (ValueError, binascii.Error):
            raise InviteError("the mesh key after '#' in the link is malformed: copy the "
                              "whole link (the key is 43 characters)") from None
        if "meshKeyCheck" in invite:
            if crypto.mesh_key_check(mesh_key, invite["meshId"]) != invite["meshKeyCheck"]:
                raise InviteError(
                    "the mesh key after '#' does not match this invite (a character changed "
                    "or is missing?): copy the whole link again, or " + EXPIRED_HINT)
            checked = True
    return ParsedInvite(token, invite, mesh_key, epoch, checked)


def join_request(token, identity, display_name, timestamp):
    """
    The body of the C{join} frame and of C{POST /join}.
    """
    invite = invites.decode_token(token)
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


def _did_you_mean(lowered, names):
    """
    C{" Did you mean bob?"} for the names that start with what was typed or
    nearly spell it (at most three), or C{""}.
    """
    by_lower = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    close = [n for n in by_lower if n.startswith(lowered)]
    close += [n for n in difflib.get_close_matches(lowered, list(by_lower), 3)
              if n not in close]
    close = [by_lower[n] for n in close[:3]]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else "%s or %s" % (", ".join(close[:-1]), close[-1])
    return " Did you mean %s?" % (listed,)


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
    if not matches:
        # The broker's rule for naming a key by a prefix (protocol.key_matches).
        for key, name in by_member.items():
            if protocol.key_matches(key, lowered):
                matches[key] = (key, name)
        for key, (member_key, name) in sessions.items():
            if protocol.key_matches(key, lowered) and member_key not in matches:
                matches[member_key] = (key, name or by_member.get(member_key, ""))
    if not matches:
        if _HEX.match(lowered) and len(lowered) < protocol.MIN_KEY_PREFIX:
            raise TargetError("not_found", 'No member is called "%s", and a key prefix needs '
                              '%d or more hex characters.' % (spec, protocol.MIN_KEY_PREFIX))
        raise TargetError("not_found", 'No member matches "%s".%s' % (
            spec, _did_you_mean(lowered, sorted(set(by_member.values())))))
    if len(matches) > 1:
        candidates = [{"name": name, "pubkey": member_key}
                      for member_key, (_, name) in sorted(matches.items())]
        raise TargetError(
            "ambiguous", '"%s" matches several members: %s' % (
                spec, ", ".join("%s (%s…)" % (c["name"], c["pubkey"][:12]) for c in candidates)),
            candidates)
    return next(iter(matches.values()))[0]
