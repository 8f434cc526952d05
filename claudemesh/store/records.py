"""
Value types that cross the store boundary.

Every time field is an integer of milliseconds since the epoch. The records are
frozen: the store hands out copies, and the broker core never mutates what it
got back from a query.
"""

import attr

ROLES = ("owner", "admin", "member")
PRIORITIES = ("now", "next", "low")
STATUSES = ("idle", "working", "dnd")
STATUS_SOURCES = ("hook", "manual", "jsonl")
DELIVERY_STATES = ("queued", "leased", "delivered", "expired")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MeshRecord:
    id: str
    name: str
    slug: str
    owner_pubkey: str
    created_at: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MemberRecord:
    id: str
    mesh_id: str
    pubkey: str
    display_name: str
    role: str
    joined_at: int
    invite_id: str | None = None
    revoked_at: int | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class InviteRecord:
    id: str
    mesh_id: str
    role: str
    max_uses: int
    expires_at: int
    created_by: str
    created_at: int
    used_count: int = 0
    revoked_at: int | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SessionRecord:
    """
    The stored mirror of one live (or once live) session, i.e. one hello.
    """

    presence_id: str
    mesh_id: str
    member_id: str
    session_id: str
    display_name: str
    pid: int
    cwd: str
    connected_at: int
    session_pubkey: str | None = None
    claude_session_id: str | None = None
    hostname: str | None = None
    peer_type: str | None = None
    channel: str | None = None
    model: str | None = None
    groups: tuple = ()
    status: str = "idle"
    status_source: str = "jsonl"
    status_updated_at: int = 0
    summary: str | None = None
    receive: bool = True
    last_active_at: int = 0
    disconnected_at: int | None = None
    # Issue 15: the node holding the connection; a watching session (the
    # local UI); a session shown as a peer (its hello's presence).
    node_id: str = ""
    watch: bool = False
    presence: bool = True


@attr.s(frozen=True, slots=True, auto_attribs=True)
class NodeRecord:
    """
    One broker process of a cluster (issue 15): its id (new at every
    start), its name (C{--node-name}, by default host and port), and its
    heartbeat (ms); C{stopped_at} once it stopped or was found dead.
    """

    id: str
    name: str
    hostname: str
    pid: int
    started_at: int
    heartbeat_at: int
    stopped_at: int | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Notice:
    """
    A wake-up for the other nodes of a cluster (issue 15), sent by the
    transaction that stores the change it is about (Postgres: C{NOTIFY},
    delivered only if that transaction commits). A hint, never the only
    copy: the tables are the truth, and a node that may have missed notices
    re-reads them.

    @ivar origin: the node id of the sender.
    @ivar kind: what happened (L{claudemesh.broker.cluster} lists them).
    @ivar data: a small JSON-able dict (a notice must stay under 8000
        bytes; wake-ups of many members are split).
    """

    origin: str
    kind: str
    mesh_id: str
    data: dict = attr.Factory(dict)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ReapedSession:
    """
    A session of a dead node that a survivor closed (issue 15).
    """

    node_id: str
    mesh_id: str
    presence_id: str
    member_id: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class NewDelivery:
    """
    One recipient of a new message.

    A member delivery (C{session_pubkey} is C{None}) may be leased to any live
    session of C{member_id} (of group C{group_name} when set); a session
    delivery belongs to the session whose key is C{session_pubkey}.

    When the broker already knows which live session will take it, the
    delivery is stored leased to that session (C{lease_session}, a presence
    id, until C{lease_until}) so no claim can hand it to anyone else while the
    push is on its way; otherwise it is stored queued.
    """

    member_id: str
    session_pubkey: str | None = None
    group_name: str | None = None
    lease_session: str | None = None
    lease_until: int | None = None

    @property
    def recipient_key(self) -> str:
        return self.session_pubkey if self.session_pubkey else self.member_id

    @property
    def recipient_kind(self) -> str:
        return "session" if self.session_pubkey else "member"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class NewMessage:
    """
    A message to store together with its deliveries and its idempotency key.
    """

    id: str
    mesh_id: str
    sender_member_id: str
    sender_pubkey: str
    sender_member_pubkey: str
    target_spec: str
    priority: str
    nonce: str
    ciphertext: str
    created_at: int
    expires_at: int
    deliveries: tuple = ()
    client_id: str | None = None
    # The mesh key epoch a broadcast or group message is sealed under
    # (issue 17); 0 for direct messages.
    key_epoch: int = 0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class EnqueueResult:
    """
    What the store decided for one L{NewMessage}: its authoritative id and
    sequence number, and whether it was a retry of an earlier send with the
    same (sender member, client id) — in which case nothing new was stored.
    """

    message_id: str
    seq: int
    duplicate: bool = False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClaimRequest:
    """
    What one session asks to lease: up to C{limit} deliveries of its member
    C{member_id} (of no group, or of one of C{groups}) and those addressed
    to its own C{session_pubkey}, of the C{priorities} it may take, leased to
    C{presence_id} until C{now + lease_ms}. A watching session
    (C{member_deliveries} false) takes its session deliveries only.
    """

    member_id: str
    session_pubkey: str | None
    presence_id: str
    groups: tuple
    priorities: tuple
    now: int
    lease_ms: int
    limit: int
    member_deliveries: bool = True


@attr.s(frozen=True, slots=True, auto_attribs=True)
class JoinOutcome:
    """
    What L{IStore.join_member} did: C{member} is the new or the existing
    membership of that key (C{None} when the invite had no use left), and
    C{joined} says whether a new one was stored (taking one use).
    """

    member: MemberRecord | None
    joined: bool


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClaimedDelivery:
    """
    A delivery leased to one session, with what the push frame needs.
    """

    message_id: str
    recipient_key: str
    recipient_kind: str
    mesh_id: str
    member_id: str
    sender_pubkey: str
    sender_member_pubkey: str
    target_spec: str
    priority: str
    nonce: str
    ciphertext: str
    created_at: int
    seq: int
    attempts: int
    key_epoch: int = 0

    @classmethod
    def fresh(cls, message, delivery, seq):
        """
        The row a claim would return for a L{NewDelivery} of a L{NewMessage}
        leased at once (stored with its first attempt).
        """
        return cls(message.id, delivery.recipient_key, delivery.recipient_kind,
                   message.mesh_id, delivery.member_id, message.sender_pubkey,
                   message.sender_member_pubkey, message.target_spec, message.priority,
                   message.nonce, message.ciphertext, message.created_at, seq, 1,
                   message.key_epoch)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SessionKeyBinding:
    """
    The one (mesh, member) a session key belongs to, from the first hello
    that proved it.
    """

    session_pubkey: str
    mesh_id: str
    member_id: str
    bound_at: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DeliveryRecord:
    """
    The state of one recipient of a message (for C{message_status}).
    """

    message_id: str
    recipient_key: str
    recipient_kind: str
    member_id: str
    state: str
    attempts: int
    expires_at: int
    acked_at: int | None = None
    lease_session: str | None = None
    lease_until: int | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AuditEvent:
    """
    An audit event to append; the store chains it (L{claudemesh.audit}).
    C{actor} is the acting member id, or C{None} for the broker itself.
    """

    mesh_id: str
    event_type: str
    actor: str | None
    payload: dict
    created_at: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AuditEntry:
    mesh_id: str
    seq: int
    event_type: str
    actor: str | None
    payload: dict
    prev_hash: str
    hash: str
    created_at: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ChainVerification:
    valid: bool
    entries: int
    broken_at: int | None = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class WriteBatch:
    """
    Everything the broker writes in one group commit, applied in this order
    in one transaction: sessions opened, messages (with deliveries, send keys)
    and audit events, session updates, acknowledgements, lease releases,
    sessions closed; then the claims, which see all of it; and the notices
    to the other nodes of a cluster, which go out when it commits.

    @ivar updates: C{[(presence_id, {column: value})]} as for
        L{IStore.update_sessions}.
    @ivar acks: C{[(message_id, member_id, recipient_key)]}, confirmed at
        C{now}.
    @ivar closes: C{[(presence_id, disconnected_at)]}.
    """

    opens: tuple = ()
    messages: tuple = ()
    audit: tuple = ()
    updates: tuple = ()
    acks: tuple = ()
    releases: tuple = ()
    closes: tuple = ()
    claims: tuple = ()
    now: int = 0
    notices: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class BatchOutcome:
    """
    What a L{WriteBatch} gave: one L{EnqueueResult} per message and one list
    of L{ClaimedDelivery} per claim, in order.
    """

    enqueued: list
    claimed: list


# -- mesh key epochs (issue 17) ----------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class KeyRotation:
    """
    A new mesh key epoch to commit: the sealed copies of its key, one per
    current member (C{copies}: C{((member_id, sealed_key), ...)}), sealed by
    the member C{rotated_by} whose key is C{sealed_by}.
    """

    mesh_id: str
    epoch: int
    rotated_by: str
    sealed_by: str
    reason: str
    created_at: int
    copies: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class KeyUpload:
    """
    What L{IStore.rotate_mesh_key} or L{IStore.share_mesh_key} did.

    @ivar stored: whether the copies were stored (for a rotation: the epoch
        committed).
    @ivar current_epoch: the mesh's current epoch after the call.
    @ivar missing: member ids of current members the upload left out.
    @ivar unexpected: member ids named that are not current members.
    @ivar shared: how many copies a share stored (members who had one
        already are skipped).
    @ivar shut_out: member ids a share named that were members, banned,
        when the epoch was made: its key is not theirs to have.
    """

    stored: bool
    current_epoch: int
    missing: tuple = ()
    unexpected: tuple = ()
    shared: int = 0
    shut_out: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SealedKeyCopy:
    """
    One member's sealed copy of one epoch's key.
    """

    mesh_id: str
    epoch: int
    member_id: str
    sealed_key: str
    sealed_by: str
    created_at: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Departure:
    """
    A member who left or was banned since the mesh key last changed.
    """

    event_type: str
    pubkey: str
    name: str | None
    at: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MeshKeyReport:
    """
    What an owner or admin is told at hello: the current epoch, who left
    since it began (C{departures}, oldest first), and the current members
    without a sealed copy of its key (L{MemberRecord}s): C{without_copy},
    who joined after it was made, and C{shut_out}, who were members but
    banned when it was made (unbanned since) — their key must be a new
    epoch's, never this one's.
    """

    epoch: int
    departures: tuple = ()
    without_copy: tuple = ()
    shut_out: tuple = ()
