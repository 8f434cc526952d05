"""
The storage seam: L{IStore} and the errors its implementations raise.

Every method returns a L{Deferred}. All SQL lives behind this interface; the
broker core only sees the records of L{claudemesh.store.records}. Two
providers pass one shared test suite (C{tests/test_store.py}): the embedded
SQLite default (also run inline, for unit tests) and Postgres.
"""

from zope.interface import Attribute, Interface


class StoreError(Exception):
    """
    Base class of the store's own errors.
    """


class StoreUnavailable(StoreError):
    """
    The database cannot be reached right now (it may come back without a
    restart of the broker).
    """


class DuplicateKey(StoreError):
    """
    A row with the same unique key exists already (a mesh id, a member id, or
    a member key already present in that mesh).
    """


class DatabaseInUse(StoreError):
    """
    Another broker process uses this single-process (SQLite) database.
    """


class SchemaTooNew(StoreError):
    """
    The database was written by a newer claudemesh: refuse to start rather
    than corrupt it.
    """


class IStore(Interface):
    """
    Durable state of the broker: meshes, members, invites, the session
    mirror, messages with their per-recipient deliveries, idempotency keys and
    the audit log.
    """

    kind = Attribute("C{'sqlite'} or C{'postgres'}.")

    def open():
        """
        Connect and bring the schema up to date (creating it when empty).
        Fails with L{SchemaTooNew} when the database is newer than the code.
        """

    def close():
        """
        Release every connection.
        """

    def ping():
        """
        Succeed when the database answers a trivial query now; fail with
        L{StoreUnavailable} otherwise.
        """

    # -- meshes and members -------------------------------------------------
    #
    # Each membership action is one transaction with its audit events
    # (C{audit}, a sequence of L{AuditEvent}s appended only when the action
    # changed something): all of it is stored, or none of it.

    def create_mesh(mesh, owner, audit=()):
        """
        Store a L{MeshRecord} and its owner L{MemberRecord}. L{DuplicateKey}
        when either id exists.
        """

    def get_mesh(mesh_id):
        """
        The L{MeshRecord} with this id, or C{None}.
        """

    def add_member(member):
        """
        Store a new L{MemberRecord} as it is (no invite involved).
        L{DuplicateKey} when its id, or its (mesh, pubkey), exists already.
        """

    def get_member(member_id):
        """
        The L{MemberRecord} with this id, or C{None}.
        """

    def find_member(mesh_id, pubkey):
        """
        The L{MemberRecord} of this member key in this mesh (revoked or not),
        or C{None}.
        """

    def list_members(mesh_id):
        """
        Every L{MemberRecord} of the mesh, revoked ones included, oldest
        first.
        """

    def join_member(member, now, audit=()):
        """
        A new key joins with the invite C{member.invite_id}. When the mesh
        already has a member with C{member.pubkey}, fires with that member
        and C{joined=False}, taking no use of the invite. Otherwise takes one
        use of the invite (neither revoked, expired at C{now} nor exhausted)
        and stores C{member}: fires with a L{JoinOutcome} that says which
        happened (C{member} C{None} when no use was left). Of N concurrent
        joins of a one-use invite exactly one is stored; a concurrent join of
        the same key fails with L{DuplicateKey} and takes no use.
        """

    def set_member_role(member_id, role, now, audit=()):
        """
        Change a member's role, revoking (at C{now}) the open invites it
        made that the new role could not make: all of them for C{member},
        its admin invites for C{admin}. Fires with C{True} when the member
        exists.
        """

    def hand_over_ownership(owner_id, heir_id, now, audit=()):
        """
        Make C{heir_id} the owner and C{owner_id} an admin, together,
        revoking (at C{now}) the admin invites C{owner_id} made. Fires with
        C{True}, or C{False} (nothing changed) when the heir is not a member
        in good standing.
        """

    def ban_member(member_id, revoked_at, audit=()):
        """
        Revoke a membership, the invite it joined with and every open
        invite it made. Fires with C{True} when it was not revoked already.
        """

    def unban_member(member_id, audit=()):
        """
        Lift a ban. Fires with C{True} when the member was banned.
        """

    def remove_member(member_id, audit=()):
        """
        Delete a membership, its queued deliveries and its session key
        bindings. Fires with C{True} when it existed.
        """

    def bind_session_key(binding):
        """
        Bind a session key to a (mesh, member) unless it is bound already
        (L{SessionKeyBinding}); atomic, so of concurrent binders of one key
        exactly one wins. Fires with the binding in force, which is another
        member's when the key was taken.
        """

    # -- invites ------------------------------------------------------------

    def create_invite(invite, audit=()):
        """
        Store a new L{InviteRecord}.
        """

    def get_invite(invite_id):
        """
        The L{InviteRecord} with this id, or C{None}.
        """

    def list_invites(mesh_id):
        """
        Every L{InviteRecord} of the mesh, oldest first.
        """

    def revoke_invite(invite_id, revoked_at, audit=()):
        """
        Mark an invite revoked. Fires with C{True} when it existed and was not
        revoked already.
        """

    # -- the session mirror -------------------------------------------------

    def open_sessions(sessions):
        """
        Insert (or replace, by presence id) these L{SessionRecord}s in one
        round trip.
        """

    def update_sessions(updates):
        """
        Apply C{[(presence_id, {column: value})]} in one transaction. Columns:
        C{status}, C{status_source}, C{status_updated_at}, C{summary},
        C{groups} (a tuple), C{display_name}, C{last_active_at}.
        """

    def close_sessions(presence_ids, disconnected_at):
        """
        Mark these sessions disconnected and release the leases they held.
        Fires with the number of sessions closed (already closed ones do not
        count).
        """

    def close_all_sessions(disconnected_at):
        """
        At start-up: every session still open was left by a previous process;
        mark them disconnected and release every lease. Fires with the number
        of sessions closed.
        """

    def list_open_sessions(mesh_id):
        """
        The L{SessionRecord}s of the mesh not yet disconnected, oldest first.
        """

    def find_open_sessions(mesh_id, member_id, session_id):
        """
        The open L{SessionRecord}s of one (mesh, member, session id), on any
        node.
        """

    def get_session(presence_id):
        """
        The L{SessionRecord} of one session (open or closed), or C{None}.
        """

    # -- the nodes of a cluster (issue 15) ---------------------------------

    def register_node(node):
        """
        Record a starting L{NodeRecord}.
        """

    def heartbeat_node(node_id, now):
        """
        Refresh a node's heartbeat. Fires with C{False} when the node had
        been found dead meanwhile (it counts as running again from now).
        """

    def stop_node(node_id, now):
        """
        Mark a node stopped (it closed its own sessions).
        """

    def reap_nodes(own_id, own_name, cutoff, now):
        """
        Close the sessions, and give back the leases, of every node but
        C{own_id} that is not running: a heartbeat older than C{cutoff}, an
        older process named C{own_name}, stopped or unknown. One node at a
        time does it; the others get C{[]}.

        @return: a L{Deferred} firing with the L{ReapedSession}s closed.
        """

    def running_nodes(cutoff):
        """
        The L{NodeRecord}s with a heartbeat at C{cutoff} or later, not
        stopped.
        """

    def use_signature(kind, signer, signature, expires_at, now):
        """
        Record one use of a signed credential until C{expires_at}. Fires
        with C{True} for its first use (or the first after its record
        expired), C{False} while another use is remembered — on any node.
        """

    def forget_signatures(now):
        """
        Delete the records of credentials expired at C{now}.
        """

    def notify(notices):
        """
        Send L{Notice}s to the other nodes in a transaction of their own (a
        no-op for a store that serves one process).
        """

    # -- messages and deliveries -------------------------------------------

    def enqueue(messages, audit=()):
        """
        Store a batch of L{NewMessage}s with their deliveries, their send keys
        and the given L{AuditEvent}s, in one transaction and one round trip
        per table. A message whose (sender member, client id) was seen before
        (and has not expired) is not stored again.

        A send key lives until its message's C{expires_at}, judged against the
        retry's own C{created_at}; a later message with an expired key stores
        normally and takes the key over. The second of two messages with the
        same key in one batch is a duplicate of the first. A duplicate whose
        original message was pruned already reports C{seq} 0. A recipient
        listed twice in one message gets one delivery. A new message whose id
        exists already fails the whole batch with L{DuplicateKey}.

        @return: a L{Deferred} firing with one L{EnqueueResult} per message,
            in order, carrying the sequence number the store assigned.
        """

    def write_batch(batch):
        """
        Apply a L{WriteBatch} in one transaction: either all of it is stored
        or none of it. Its claims run last and see its writes.

        @return: a L{Deferred} firing with a L{BatchOutcome}.
        """

    def claim_deliveries(request):
        """
        Lease to the session of a L{ClaimRequest} up to C{request.limit}
        deliveries it may take now, in C{seq} order: deliveries of
        C{request.member_id} only — member deliveries whose group is C{None}
        or in C{request.groups}, and session deliveries to
        C{request.session_pubkey} — with a priority in C{request.priorities},
        not expired at C{request.now}, and either queued or leased with a
        lease that ended by then. Sets the lease to C{now + lease_ms} and
        counts an attempt. With C{request.member_deliveries} false, only the
        session deliveries are claimed (a watching session).

        @return: a L{Deferred} firing with a list of L{ClaimedDelivery}.
        """

    def ack_deliveries(acks, now):
        """
        Confirm C{[(message_id, member_id, recipient_key)]}: each queued or
        leased delivery of that member becomes delivered. Unknown or already
        confirmed ones, and another member's, are ignored. Fires with the
        number of deliveries confirmed.
        """

    def release_leases(presence_ids):
        """
        Return the deliveries leased to these sessions to the queue (their
        session went away). Fires with the number released.
        """

    def get_message(message_id):
        """
        The stored message as a L{NewMessage} (without deliveries, and with
        C{client_id} C{None}: the message table does not keep it), or
        C{None}.
        """

    def message_deliveries(message_id):
        """
        The L{DeliveryRecord}s of a message.
        """

    def expire_deliveries(now, limit=None):
        """
        Mark queued or leased deliveries whose expiry passed as expired: all
        of them, or at most C{limit} (the earliest expiries first) in this
        transaction. Fires with the count.
        """

    def delete_messages_before(cutoff, limit=None):
        """
        Delete messages created before C{cutoff} that have no queued or
        leased delivery left, with their deliveries: all of them, or at
        most C{limit} (the oldest first) in this transaction. Fires with the
        number of messages deleted.
        """

    def delete_send_keys_before(cutoff, limit=None):
        """
        Delete send keys (idempotency keys) that expired at or before
        C{cutoff}: all of them, or at most C{limit}. Fires with the count.
        """

    def count_queued():
        """
        The number of deliveries queued or leased (for the metrics gauge).
        """

    # -- mesh key epochs (issue 17) ------------------------------------------

    def current_key_epoch(mesh_id):
        """
        The mesh's current key epoch: that of its last committed rotation,
        0 (the invite links' key) before any.
        """

    def rotate_mesh_key(rotation, audit=()):
        """
        Commit a L{KeyRotation} in one transaction with C{audit}: only when
        its C{epoch} is the current one plus one and its copies name exactly
        the mesh's members in good standing (not banned), each once. Fires
        with a L{KeyUpload}: C{stored} true and the new epoch current, or
        nothing stored and C{missing}/C{unexpected} saying how the copies
        and the members differ (both empty when the epoch was not the next).
        """

    def share_mesh_key(mesh_id, epoch, copies, sealed_by, created_at):
        """
        Store sealed copies (C{((member_id, sealed_key), ...)}) of the
        current epoch's key for members in good standing; a member that has
        one keeps it. Fires with a L{KeyUpload}: nothing stored when C{epoch}
        is not current (or is 0), some id is not such a member
        (C{unexpected}), or some member without a copy joined before the
        epoch was made, so was banned then (C{shut_out}); else C{shared}
        counts the copies stored.
        """

    def key_epoch_made_at(mesh_id, epoch):
        """
        When C{epoch} was committed (milliseconds), or C{None} (epoch 0 or
        none).
        """

    def get_mesh_key_copy(mesh_id, epoch, member_id):
        """
        The member's L{SealedKeyCopy} of that epoch's key, or C{None}.
        """

    def mesh_key_report(mesh_id, limit):
        """
        A L{MeshKeyReport}: the current epoch; the members who left or were
        banned since it began (by the audit log) and are not members in good
        standing again; and up to C{limit} members in good standing with no
        sealed copy of its key (none for epoch 0), who joined after it was
        made (C{without_copy}) or before it, banned then (C{shut_out}).
        """

    # -- audit --------------------------------------------------------------

    def append_audit(events):
        """
        Chain and store L{AuditEvent}s. Fires with the L{AuditEntry}s written.
        """

    def audit_entries(mesh_id, limit, offset, event_type=None):
        """
        Fires with C{(entries, total)}: the mesh's L{AuditEntry}s, newest
        first, optionally only of one event type.
        """

    def verify_chain(mesh_id):
        """
        Walk the mesh's chain, recomputing every hash. Fires with a
        L{ChainVerification}: C{entries} counts every row of the chain,
        C{broken_at} is the C{seq} of the first row whose link or hash does
        not match.
        """
