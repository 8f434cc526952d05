"""
L{MemoryStore}: an L{IStore} in plain Python objects, for unit tests of the
broker core.

Every method runs synchronously and returns an already-fired L{Deferred}
(success or failure), so tests need neither a reactor nor threads. A new store is usable without
calling L{MemoryStore.open}; after L{MemoryStore.close} it fails every call
with L{StoreUnavailable} until opened again. It passes
the same suite as the SQL stores (C{tests/test_store.py}), so the core can be
tested against it and trust the real stores to behave alike. Closing and
reopening the same instance keeps its data, as a database file would.
"""

import copy

import attr
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from claudemesh.store._sql import (
    ChainChecker,
    chain_events,
    merge_session_updates,
)
from claudemesh.store.interface import (
    DuplicateKey,
    IStore,
    SchemaTooNew,
    StoreUnavailable,
)
from claudemesh.store.records import (
    ClaimedDelivery,
    DeliveryRecord,
    EnqueueResult,
)
from claudemesh.store.schema import CURRENT_VERSION

PENDING = ("queued", "leased")


def _fired(d):
    """
    The result of an already-fired L{Deferred}, raising its failure.
    """
    outcome = []
    d.addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def _synchronously(method):
    """
    Run C{method} now and wrap its outcome in a fired L{Deferred}.
    """

    def wrapper(self, *args, **kwargs):
        if not self._open:
            return defer.fail(StoreUnavailable("the memory store is not open"))
        return defer.maybeDeferred(method, self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


@attr.s(slots=True, auto_attribs=True)
class _Delivery:
    """
    The mutable state of one delivery row.
    """

    message_id: str
    recipient_key: str
    recipient_kind: str
    mesh_id: str
    member_id: str
    group_name: str | None
    priority: str
    seq: int
    expires_at: int
    state: str = "queued"
    attempts: int = 0
    acked_at: int | None = None
    lease_session: str | None = None
    lease_until: int | None = None

    def record(self) -> DeliveryRecord:
        return DeliveryRecord(
            message_id=self.message_id,
            recipient_key=self.recipient_key,
            recipient_kind=self.recipient_kind,
            member_id=self.member_id,
            state=self.state,
            attempts=self.attempts,
            expires_at=self.expires_at,
            acked_at=self.acked_at,
            lease_session=self.lease_session,
            lease_until=self.lease_until,
        )

    def release(self):
        self.state = "queued"
        self.lease_session = None
        self.lease_until = None


@implementer(IStore)
class MemoryStore:
    """
    An L{IStore} that keeps everything in dictionaries.

    @ivar schema_version: what the "database" claims its schema version is;
        tests set it to exercise L{SchemaTooNew}.
    """

    kind = "memory"

    def __init__(self):
        # Usable as soon as it exists: broker unit tests need not open it.
        self._open = True
        self.schema_version = CURRENT_VERSION
        self._meshes = {}
        self._members = {}
        self._invites = {}
        self._sessions = {}
        # message id -> (NewMessage without deliveries, seq)
        self._messages = {}
        # (message id, recipient key) -> _Delivery
        self._deliveries = {}
        # (sender member id, client id) -> (message id, expires_at)
        self._send_keys = {}
        # mesh id -> [AuditEntry] in seq order
        self._audit = {}
        self._last_seq = 0

    def open(self):
        if self.schema_version > CURRENT_VERSION:
            return defer.fail(
                SchemaTooNew(
                    "schema version %d is newer than %d"
                    % (self.schema_version, CURRENT_VERSION)
                )
            )
        self._open = True
        return defer.succeed(None)

    def close(self):
        self._open = False
        return defer.succeed(None)

    @_synchronously
    def ping(self):
        return None

    # -- meshes and members -------------------------------------------------

    def _check_member_unique(self, member):
        if member.id in self._members:
            raise DuplicateKey("member %r exists" % (member.id,))
        for other in self._members.values():
            if other.mesh_id == member.mesh_id and other.pubkey == member.pubkey:
                raise DuplicateKey(
                    "key %r is already a member of mesh %r"
                    % (member.pubkey, member.mesh_id)
                )

    @_synchronously
    def create_mesh(self, mesh, owner):
        if mesh.id in self._meshes:
            raise DuplicateKey("mesh %r exists" % (mesh.id,))
        self._check_member_unique(owner)
        self._meshes[mesh.id] = mesh
        self._members[owner.id] = owner

    @_synchronously
    def get_mesh(self, mesh_id):
        return self._meshes.get(mesh_id)

    @_synchronously
    def add_member(self, member):
        self._check_member_unique(member)
        self._members[member.id] = member

    @_synchronously
    def get_member(self, member_id):
        return self._members.get(member_id)

    @_synchronously
    def find_member(self, mesh_id, pubkey):
        for member in self._members.values():
            if member.mesh_id == mesh_id and member.pubkey == pubkey:
                return member
        return None

    @_synchronously
    def list_members(self, mesh_id):
        members = [m for m in self._members.values() if m.mesh_id == mesh_id]
        return sorted(members, key=lambda m: (m.joined_at, m.id))

    def _change_member(self, member_id, **changes):
        member = self._members.get(member_id)
        if member is None:
            return False
        self._members[member_id] = attr.evolve(member, **changes)
        return True

    @_synchronously
    def set_member_role(self, member_id, role):
        return self._change_member(member_id, role=role)

    @_synchronously
    def set_member_revoked(self, member_id, revoked_at):
        return self._change_member(member_id, revoked_at=revoked_at)

    @_synchronously
    def remove_member(self, member_id):
        for key, delivery in list(self._deliveries.items()):
            if delivery.member_id == member_id and delivery.state in PENDING:
                del self._deliveries[key]
        return self._members.pop(member_id, None) is not None

    # -- invites ------------------------------------------------------------

    @_synchronously
    def create_invite(self, invite):
        if invite.id in self._invites:
            raise DuplicateKey("invite %r exists" % (invite.id,))
        self._invites[invite.id] = invite

    @_synchronously
    def get_invite(self, invite_id):
        return self._invites.get(invite_id)

    @_synchronously
    def list_invites(self, mesh_id):
        invites = [i for i in self._invites.values() if i.mesh_id == mesh_id]
        return sorted(invites, key=lambda i: (i.created_at, i.id))

    @_synchronously
    def revoke_invite(self, invite_id, revoked_at):
        invite = self._invites.get(invite_id)
        if invite is None or invite.revoked_at is not None:
            return False
        self._invites[invite_id] = attr.evolve(invite, revoked_at=revoked_at)
        return True

    @_synchronously
    def consume_invite(self, invite_id, now):
        invite = self._invites.get(invite_id)
        if (
            invite is None
            or invite.revoked_at is not None
            or invite.expires_at <= now
            or invite.used_count >= invite.max_uses
        ):
            return False
        self._invites[invite_id] = attr.evolve(
            invite, used_count=invite.used_count + 1
        )
        return True

    # -- the session mirror -------------------------------------------------

    @_synchronously
    def open_sessions(self, sessions):
        for session in sessions:
            self._sessions[session.presence_id] = attr.evolve(
                session, groups=tuple(session.groups)
            )

    @_synchronously
    def update_sessions(self, updates):
        for presence_id, changes in merge_session_updates(updates).items():
            session = self._sessions.get(presence_id)
            if session is None:
                continue
            if "groups" in changes:
                changes = dict(changes, groups=tuple(changes["groups"]))
            self._sessions[presence_id] = attr.evolve(session, **changes)

    def _release(self, presence_ids):
        presence_ids = set(presence_ids)
        released = 0
        for delivery in self._deliveries.values():
            if delivery.state == "leased" and delivery.lease_session in presence_ids:
                delivery.release()
                released += 1
        return released

    @_synchronously
    def close_sessions(self, presence_ids, disconnected_at):
        closed = 0
        for presence_id in set(presence_ids):
            session = self._sessions.get(presence_id)
            if session is not None and session.disconnected_at is None:
                self._sessions[presence_id] = attr.evolve(
                    session, disconnected_at=disconnected_at
                )
                closed += 1
        self._release(presence_ids)
        return closed

    @_synchronously
    def close_all_sessions(self, disconnected_at):
        closed = 0
        for presence_id, session in list(self._sessions.items()):
            if session.disconnected_at is None:
                self._sessions[presence_id] = attr.evolve(
                    session, disconnected_at=disconnected_at
                )
                closed += 1
        for delivery in self._deliveries.values():
            if delivery.state == "leased":
                delivery.release()
        return closed

    @_synchronously
    def list_open_sessions(self, mesh_id):
        sessions = [
            s
            for s in self._sessions.values()
            if s.mesh_id == mesh_id and s.disconnected_at is None
        ]
        return sorted(sessions, key=lambda s: (s.connected_at, s.presence_id))

    # -- messages and deliveries -------------------------------------------

    @_synchronously
    def enqueue(self, messages, audit=()):
        # Decide everything before changing anything, so that a failure
        # leaves the store as it was: the SQL stores' single transaction.
        messages = list(messages)
        results = []
        first_in_batch = {}
        pending = []
        seq = self._last_seq
        for message in messages:
            key = (message.sender_member_id, message.client_id)
            if message.client_id is not None:
                if key in first_in_batch:
                    results.append(attr.evolve(first_in_batch[key], duplicate=True))
                    continue
                hit = self._send_keys.get(key)
                if hit is not None and hit[1] > message.created_at:
                    stored = self._messages.get(hit[0])
                    results.append(
                        EnqueueResult(hit[0], stored[1] if stored else 0, True)
                    )
                    continue
            seq += 1
            result = EnqueueResult(message.id, seq)
            if message.client_id is not None:
                first_in_batch[key] = result
            results.append(result)
            pending.append((message, seq))
        fresh_ids = set()
        for message, _ in pending:
            if message.id in self._messages or message.id in fresh_ids:
                raise DuplicateKey("message %r exists" % (message.id,))
            fresh_ids.add(message.id)
        entries = self._chain(list(audit))

        self._last_seq = seq
        for message, seq in pending:
            self._messages[message.id] = (attr.evolve(message, deliveries=()), seq)
            for delivery in message.deliveries:
                key = (message.id, delivery.recipient_key)
                if key in self._deliveries:
                    continue
                self._deliveries[key] = _Delivery(
                    message_id=message.id,
                    recipient_key=delivery.recipient_key,
                    recipient_kind=delivery.recipient_kind,
                    mesh_id=message.mesh_id,
                    member_id=delivery.member_id,
                    group_name=delivery.group_name,
                    priority=message.priority,
                    seq=seq,
                    expires_at=message.expires_at,
                )
                if delivery.lease_session:
                    # Pushed at once by the broker (see NewDelivery): stored
                    # leased so no claim hands it on meanwhile.
                    stored = self._deliveries[key]
                    stored.state = "leased"
                    stored.attempts = 1
                    stored.lease_session = delivery.lease_session
                    stored.lease_until = delivery.lease_until
            if message.client_id is not None:
                self._send_keys[(message.sender_member_id, message.client_id)] = (
                    message.id,
                    message.expires_at,
                )
        self._store_audit(entries)
        return results

    def _claimable(self, delivery, member_id, session_pubkey, groups, priorities, now):
        if delivery.recipient_kind == "member":
            mine = delivery.member_id == member_id and (
                delivery.group_name is None or delivery.group_name in groups
            )
        else:
            mine = bool(session_pubkey) and delivery.recipient_key == session_pubkey
        return (
            mine
            and delivery.priority in priorities
            and delivery.expires_at > now
            and (
                delivery.state == "queued"
                or (delivery.state == "leased" and delivery.lease_until <= now)
            )
        )

    @_synchronously
    def claim_deliveries(
        self,
        member_id,
        session_pubkey,
        presence_id,
        groups,
        priorities,
        now,
        lease_ms,
        limit,
    ):
        groups = set(groups)
        priorities = set(priorities)
        candidates = sorted(
            (
                d
                for d in self._deliveries.values()
                if self._claimable(d, member_id, session_pubkey, groups, priorities, now)
            ),
            key=lambda d: (d.seq, d.recipient_key),
        )[: max(limit, 0)]
        claimed = []
        for delivery in candidates:
            delivery.state = "leased"
            delivery.lease_session = presence_id
            delivery.lease_until = now + lease_ms
            delivery.attempts += 1
            message = self._messages[delivery.message_id][0]
            claimed.append(
                ClaimedDelivery(
                    message_id=delivery.message_id,
                    recipient_key=delivery.recipient_key,
                    recipient_kind=delivery.recipient_kind,
                    mesh_id=delivery.mesh_id,
                    member_id=delivery.member_id,
                    sender_pubkey=message.sender_pubkey,
                    sender_member_pubkey=message.sender_member_pubkey,
                    target_spec=message.target_spec,
                    priority=delivery.priority,
                    nonce=message.nonce,
                    ciphertext=message.ciphertext,
                    created_at=message.created_at,
                    seq=delivery.seq,
                    attempts=delivery.attempts,
                )
            )
        return claimed

    @_synchronously
    def ack_deliveries(self, acks, now):
        confirmed = 0
        for key in set(acks):
            delivery = self._deliveries.get(tuple(key))
            if delivery is not None and delivery.state in PENDING:
                delivery.state = "delivered"
                delivery.acked_at = now
                delivery.lease_until = None
                confirmed += 1
        return confirmed

    @_synchronously
    def release_leases(self, presence_ids):
        return self._release(presence_ids)

    def write_batch(self, batch):
        # The same steps as the SQL stores, one after another; each fires at
        # once. Unlike their single transaction, a failure part-way leaves
        # the earlier steps applied (the memory store serves unit tests).
        results = []
        try:
            if batch.opens:
                _fired(self.open_sessions(batch.opens))
            if batch.messages or batch.audit:
                results = _fired(self.enqueue(batch.messages, batch.audit))
            if batch.updates:
                _fired(self.update_sessions(batch.updates))
            if batch.acks:
                _fired(self.ack_deliveries(batch.acks, batch.now))
            if batch.releases:
                _fired(self.release_leases(batch.releases))
            for presence_id, when in batch.closes:
                _fired(self.close_sessions([presence_id], when))
        except Exception:
            return defer.fail()
        return defer.succeed(results)

    @_synchronously
    def get_message(self, message_id):
        stored = self._messages.get(message_id)
        if stored is None:
            return None
        # The SQL stores do not keep the client id with the message.
        return attr.evolve(stored[0], client_id=None)

    @_synchronously
    def message_deliveries(self, message_id):
        records = [
            d.record() for d in self._deliveries.values() if d.message_id == message_id
        ]
        return sorted(records, key=lambda r: r.recipient_key)

    @_synchronously
    def expire_deliveries(self, now):
        count = 0
        for delivery in self._deliveries.values():
            if delivery.state in PENDING and delivery.expires_at <= now:
                delivery.state = "expired"
                delivery.lease_until = None
                count += 1
        return count

    @_synchronously
    def delete_messages_before(self, cutoff):
        pending = {
            d.message_id for d in self._deliveries.values() if d.state in PENDING
        }
        doomed = {
            message_id
            for message_id, (message, _) in self._messages.items()
            if message.created_at < cutoff and message_id not in pending
        }
        for message_id in doomed:
            del self._messages[message_id]
        for key in [k for k in self._deliveries if k[0] in doomed]:
            del self._deliveries[key]
        for key, (_, expires_at) in list(self._send_keys.items()):
            if expires_at <= cutoff:
                del self._send_keys[key]
        return len(doomed)

    @_synchronously
    def count_queued(self):
        return sum(1 for d in self._deliveries.values() if d.state in PENDING)

    # -- audit --------------------------------------------------------------

    def _chain(self, events):
        tails = {
            mesh_id: (entries[-1].seq, entries[-1].hash)
            for mesh_id, entries in self._audit.items()
            if entries
        }
        return chain_events(events, tails)

    def _store_audit(self, entries):
        for entry in entries:
            self._audit.setdefault(entry.mesh_id, []).append(entry)

    @_synchronously
    def append_audit(self, events):
        entries = self._chain(list(events))
        self._store_audit(entries)
        # Callers get their own copies: payloads are mutable dicts.
        return copy.deepcopy(entries)

    @_synchronously
    def audit_entries(self, mesh_id, limit, offset, event_type=None):
        entries = [
            e
            for e in self._audit.get(mesh_id, ())
            if event_type is None or e.event_type == event_type
        ]
        newest_first = list(reversed(entries))[offset : offset + limit]
        return (copy.deepcopy(newest_first), len(entries))

    @_synchronously
    def verify_chain(self, mesh_id):
        checker = ChainChecker()
        for entry in self._audit.get(mesh_id, ()):
            checker.feed(entry)
        return checker.result()

    def tamper_audit(self, mesh_id, seq, payload):
        """
        Overwrite one audit entry's payload in place, as an attacker with
        write access to the database could: for tests of L{verify_chain}.
        """
        entries = self._audit[mesh_id]
        for index, entry in enumerate(entries):
            if entry.seq == seq:
                entries[index] = attr.evolve(entry, payload=payload)
