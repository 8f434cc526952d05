"""
Identity keys, the canonical signed strings of the protocol, and message
encryption.

All signed strings are UTF-8, fields joined with C{|}, signed with an ed25519
detached signature carried as lowercase hex (docs/protocol.md, signed strings). Direct
messages use crypto_box between X25519 keys derived from the ed25519 keys;
broadcasts use secretbox under the 32-byte mesh key.
"""

import base64
import binascii
import hashlib
import hmac
import re

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
HEX128 = re.compile(r"\A[0-9a-f]{128}\Z")

HELLO_TAG = "claudemesh-hello/1"
SESSION_PROOF_TAG = "claudemesh-session/1"
CREATE_TAG = "claudemesh-create/1"
INVITE_TAG = "claudemesh-invite/1"
# An invite that carries a check value of the mesh key signs it too.
INVITE_CHECKED_TAG = "claudemesh-invite/2"
MESH_KEY_CHECK_TAG = "claudemesh-mesh-key-check/1"
HEX32 = re.compile(r"\A[0-9a-f]{32}\Z")
JOIN_TAG = "claudemesh-join/1"
HOOK_TAG = "claudemesh-hook/1"


class DecryptionFailed(Exception):
    """
    A message could not be opened with the secret its target named.
    """


# -- signed strings ---------------------------------------------------------


def hello_string(mesh_id, member_id, pubkey, timestamp, session_id=None) -> bytes:
    """
    What a hello signs: C{meshId|memberId|pubkey|timestamp}, as the original
    clients sign it, or, given C{session_id}, the tagged form
    C{claudemesh-hello/1|meshId|memberId|pubkey|timestamp|sessionId}, which
    has a domain tag like every other signed string of the protocol and
    binds the session id too (docs/protocol.md). The session id, which may
    hold any character, comes last, so the fields stay unambiguous.
    """
    fields = [mesh_id, member_id, pubkey, str(timestamp)]
    if session_id is not None:
        fields = [HELLO_TAG] + fields + [session_id]
    return "|".join(fields).encode("utf-8")


def verify_hello(pubkey, mesh_id, member_id, timestamp, session_id, signature) -> bool:
    """
    Does C{signature} sign this hello, in the tagged or the untagged form?
    The untagged form is safe to accept because a hello's C{meshId} must be
    an id (no C{/}, no C{|}): no tagged string of another kind reads as one.
    """
    return verify(pubkey, hello_string(mesh_id, member_id, pubkey, timestamp, session_id),
                  signature) or verify(
        pubkey, hello_string(mesh_id, member_id, pubkey, timestamp), signature)


def session_proof_string(mesh_id, member_pubkey, session_pubkey) -> bytes:
    return "|".join([SESSION_PROOF_TAG, mesh_id, member_pubkey, session_pubkey]).encode(
        "utf-8"
    )


def create_mesh_string(name, owner_pubkey, timestamp) -> bytes:
    return "|".join([CREATE_TAG, name, owner_pubkey, str(timestamp)]).encode("utf-8")


def invite_string(mesh_id, invite_id, role, expires_at, inviter_pubkey, broker_url,
                  mesh_key_check=None) -> bytes:
    """
    What an inviter signs. Without a mesh key check value it is the string
    of docs/protocol.md, signed strings (C{claudemesh-invite/1|…|brokerUrl}); with one, it
    is C{claudemesh-invite/2|…|brokerUrl|meshKeyCheck}, so the check value
    cannot be stripped or swapped without breaking the signature.
    """
    fields = [mesh_id, invite_id, role, str(expires_at), inviter_pubkey, broker_url]
    if mesh_key_check is None:
        return "|".join([INVITE_TAG] + fields).encode("utf-8")
    return "|".join([INVITE_CHECKED_TAG] + fields + [mesh_key_check]).encode("utf-8")


def mesh_key_check(mesh_key: bytes, mesh_id: str) -> str:
    """
    A check value of the mesh key, to carry in signed invites: the first 16
    bytes (hex) of HMAC-SHA256 under the key of a fixed string and the mesh
    id. Whoever lacks the key (the broker) learns nothing about it from this
    value (HMAC is a pseudo-random function of the key), yet a joiner can
    tell a mistyped or altered key from the right one.
    """
    mac = hmac.new(mesh_key, ("%s|%s" % (MESH_KEY_CHECK_TAG, mesh_id)).encode("utf-8"),
                   hashlib.sha256)
    return mac.hexdigest()[:32]


def is_mesh_key_check(value) -> bool:
    return isinstance(value, str) and HEX32.match(value) is not None


def join_string(invite_id, pubkey, display_name, timestamp) -> bytes:
    return "|".join([JOIN_TAG, invite_id, pubkey, display_name, str(timestamp)]).encode(
        "utf-8"
    )


def hook_string(mesh_id, timestamp, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "|".join(
        [HOOK_TAG, "POST", "/hook/set-status", mesh_id, str(timestamp), digest]
    ).encode("utf-8")


# -- ed25519 ----------------------------------------------------------------


def is_pubkey(value) -> bool:
    """
    Is C{value} a lowercase-hex ed25519 public key?
    """
    return isinstance(value, str) and HEX64.match(value) is not None


def is_signature(value) -> bool:
    return isinstance(value, str) and HEX128.match(value) is not None


def verify(pubkey_hex: str, message: bytes, signature_hex: str) -> bool:
    """
    Check a detached ed25519 signature. Malformed keys or signatures are
    simply C{False}: callers check the shape first when they need to tell
    C{malformed} from C{bad_signature}.
    """
    try:
        key = nacl.signing.VerifyKey(binascii.unhexlify(pubkey_hex))
        key.verify(message, binascii.unhexlify(signature_hex))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError,
            ValueError, TypeError, binascii.Error):
        return False
    return True


class Identity:
    """
    An ed25519 key pair: a member identity or a session key.
    """

    def __init__(self, signing_key: nacl.signing.SigningKey):
        self._signing_key = signing_key

    @classmethod
    def generate(cls):
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_secret_hex(cls, secret_hex: str):
        """
        Load from the hex of the 32-byte seed, or of libsodium's 64-byte
        secret key (seed followed by the public key), as the original stores.
        """
        raw = binascii.unhexlify(secret_hex)
        if len(raw) == 64:
            raw = raw[:32]
        return cls(nacl.signing.SigningKey(raw))

    @property
    def pubkey(self) -> str:
        return self._signing_key.verify_key.encode().hex()

    @property
    def secret_hex(self) -> str:
        # libsodium's 64-byte form, compatible with the original's config.
        return (bytes(self._signing_key) + self._signing_key.verify_key.encode()).hex()

    def sign(self, message: bytes) -> str:
        return self._signing_key.sign(message).signature.hex()

    def box_private_key(self) -> nacl.public.PrivateKey:
        return self._signing_key.to_curve25519_private_key()


def box_public_key(pubkey_hex: str) -> nacl.public.PublicKey:
    """
    The X25519 public key of an ed25519 public key.
    """
    return nacl.signing.VerifyKey(binascii.unhexlify(pubkey_hex)).to_curve25519_public_key()


# -- message encryption -----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def encrypt_direct(sender: Identity, recipient_pubkey: str, plaintext: bytes):
    """
    crypto_box a direct message. Returns C{(nonce, ciphertext)} as standard
    padded base64; the ciphertext excludes the nonce.
    """
    box = nacl.public.Box(sender.box_private_key(), box_public_key(recipient_pubkey))
    nonce = nacl.utils.random(nacl.public.Box.NONCE_SIZE)
    sealed = box.encrypt(plaintext, nonce)
    return _b64(nonce), _b64(sealed.ciphertext)


def decrypt_direct(recipient: Identity, sender_pubkey: str, nonce: str, ciphertext: str) -> bytes:
    try:
        box = nacl.public.Box(recipient.box_private_key(), box_public_key(sender_pubkey))
        return box.decrypt(_unb64(ciphertext), _unb64(nonce))
    except (nacl.exceptions.CryptoError, ValueError, TypeError, binascii.Error) as e:
        raise DecryptionFailed(str(e)) from None


def new_mesh_key() -> bytes:
    return nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)


def encode_mesh_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")


def decode_mesh_key(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    key = base64.urlsafe_b64decode(padded.encode("ascii"))
    if len(key) != nacl.secret.SecretBox.KEY_SIZE:
        raise ValueError("a mesh key is 32 bytes")
    return key


def encrypt_broadcast(mesh_key: bytes, plaintext: bytes):
    """
    secretbox a broadcast under the mesh key; C{(nonce, ciphertext)} in base64.
    """
    nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
    sealed = nacl.secret.SecretBox(mesh_key).encrypt(plaintext, nonce)
    return _b64(nonce), _b64(sealed.ciphertext)


def decrypt_broadcast(mesh_key: bytes, nonce: str, ciphertext: str) -> bytes:
    try:
        return nacl.secret.SecretBox(mesh_key).decrypt(_unb64(ciphertext), _unb64(nonce))
    except (nacl.exceptions.CryptoError, ValueError, TypeError, binascii.Error) as e:
        raise DecryptionFailed(str(e)) from None


# -- mesh key epochs (issue 17) ---------------------------------------------
#
# A rotated mesh key reaches each member as a crypto_box from the rotating
# member's key to the recipient's member key (both X25519, derived from the
# ed25519 identities). The sealed plaintext binds the key to its mesh and
# epoch, so a broker cannot hand an old epoch's copy out as a newer one, or
# one mesh's as another's: 16 bytes of SHA-256 over
# "claudemesh-mesh-key/1|meshId|epoch", then the 32-byte key.

MESH_KEY_TAG = "claudemesh-mesh-key/1"
_BINDING_BYTES = 16


def mesh_key_binding(mesh_id, epoch) -> bytes:
    return hashlib.sha256(
        "|".join([MESH_KEY_TAG, mesh_id, str(epoch)]).encode("utf-8")).digest()[:_BINDING_BYTES]


def seal_mesh_key(sender: Identity, recipient_pubkey: str, mesh_id, epoch, key: bytes) -> str:
    """
    Seal the mesh key of C{epoch} for the member whose ed25519 key is
    C{recipient_pubkey}: standard base64 of the nonce and the crypto_box.
    """
    if len(key) != nacl.secret.SecretBox.KEY_SIZE:
        raise ValueError("a mesh key is 32 bytes")
    box = nacl.public.Box(sender.box_private_key(), box_public_key(recipient_pubkey))
    return _b64(bytes(box.encrypt(mesh_key_binding(mesh_id, epoch) + key)))


def open_mesh_key(recipient: Identity, sender_pubkey: str, mesh_id, epoch, sealed: str) -> bytes:
    """
    The mesh key of C{epoch} from a copy sealed by C{sender_pubkey}.

    @raise DecryptionFailed: not sealed by that key for this member, or
        bound to another mesh or epoch.
    """
    try:
        box = nacl.public.Box(recipient.box_private_key(), box_public_key(sender_pubkey))
        opened = box.decrypt(_unb64(sealed))
    except (nacl.exceptions.CryptoError, ValueError, TypeError, binascii.Error) as e:
        raise DecryptionFailed(str(e)) from None
    binding, key = opened[:_BINDING_BYTES], opened[_BINDING_BYTES:]
    if binding != mesh_key_binding(mesh_id, epoch) or len(key) != nacl.secret.SecretBox.KEY_SIZE:
        raise DecryptionFailed("the sealed key is not the key of epoch %d of this mesh" % (epoch,))
    return key
