"""
The broker's domain: meshes, live sessions, presence, status, routing and
delivery.

No sockets and no SQL here. A session's connection is anything providing
L{IPeerConnection} (the WebSocket protocol in production, a list in tests);
durable state goes through an L{IStore} (writes via L{GroupCommit}); time
comes from the injected clock. The rules implemented are DESIGN sections
4.2 (delivery) and 4.3 (sessions, presence, status).

Delivery in one paragraph: a C{send} becomes one message and one delivery per
recipient, committed before the sender's C{ack}. When a live session may take
a delivery right away, the delivery is stored already leased to it and pushed
after the commit; otherwise it waits in the store, and is claimed (leased in
the store) when its recipient connects, turns idle, joins the group, or when a
lease ends without a C{client_ack}. A lease lasts C{lease_seconds}; a session
that goes away gives its leases back at once.
"""

import collections
import itertools
import json
import random
import secrets
import uuid

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from claudemesh import crypto, protocol
from claudemesh.audit import iso_millis
from claudemesh.broker import pages
from claudemesh.broker.groupcommit import GroupCommit
from claudemesh.broker.ratelimit import TokenBuckets
from claudemesh.broker.status import DELIVERABLE, StatusState, apply_signal, decay, may_receive
from claudemesh.store.records import (
    AuditEvent,
    ClaimRequest,
    NewDelivery,
    NewMessage,
    SessionKeyBinding,
    SessionRecord,
)

HELLO_SKEW_MS = 60_000
CLAIM_BATCH = 200
# How often the clock-driven sweeps run: status decay, lease expiry, pending
# hook signals, rate-limit buckets. Short enough that a 30 s lease or a 60 s
# TTL is honoured within a few seconds.
SWEEP_INTERVAL = 5.0
# How long a shutdown waits after sending 1001 close frames.
SHUTDOWN_CLOSE_WAIT = 0.5


def new_id() -> str:
    """
    A fresh 128-bit identifier as 32 hex characters, from a generator seeded
    from the system's randomness rather than one system call per id (the hot
    path makes one per message). Ids need to be unique, not secret: knowing
    one grants nothing (C{message_status} is scoped to the mesh, and a
    C{client_ack} only touches the caller's own deliveries).
    """
    return "%032x" % _ids.getrandbits(128)


_ids = random.Random(secrets.randbits(256))


class Refusal(Exception):
    """
    A request the broker refuses: becomes C{error {code, message}}, and for a
    hello also a close with C{close} = C{(code, reason)}.
    """

    def __init__(self, code, message, close=None, **extra):
        Exception.__init__(self, code, message)
        self.code = code
        self.message = message
        self.close = close
        self.extra = extra


class IPeerConnection(Interface):
    """
    What the core needs of one client connection.
    """

    peer_address = Attribute("The client's address as a string, for logs and limits.")

    def send(frame):
        """
        Send one frame (a dict) to the client.
        """

    def send_encoded(payload):
        """
        Send one frame already encoded with L{protocol.encode}.
        """

    def close(code, reason):
        """
        Close the connection with this WebSocket close code and reason.
        """


def revoked_message(mesh_name):
    return 'You\'ve been removed from "%s". Contact the mesh owner to rejoin.' % (mesh_name,)


def group_matches(session_group, target_group) -> bool:
    """
    Does membership of C{session_group} make a session a recipient of
    C{@target_group}? A group matches itself and every group above it
    (C{a/b} matches C{@a}).
    """
    return session_group == target_group or session_group.startswith(target_group + "/")


def expand_groups(groups):
    """
    Every group name a session with these groups receives for: each group and
    all its ancestors.
    """
    names = set()
    for name in groups:
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            names.add("/".join(parts[:i]))
    return sorted(names)


class Session:
    """
    One hello's session: live (with a connection) or in grace (without).
    """

    # Sessions in the order this process made them: with connected_at, the
    # sort key of peers_list (and of its page cursors).
    _made = itertools.count(1)

    def __init__(self, mesh, member, hello, presence_id, now, display_name):
        self.order = next(self._made)
        self.mesh = mesh
        self.member = member
        self.presence_id = presence_id
        self.session_id = hello.sessionId
        self.session_pubkey = hello.sessionPubkey or None
        self.claude_session_id = hello.claudeSessionId
        self.display_name = display_name
        self.pid = hello.pid
        self.cwd = hello.cwd
        self.hostname = hello.hostname
        self.peer_type = hello.peerType
        self.channel = hello.channel
        self.model = hello.model
        self.groups = dict(hello.groups)
        self.receive = hello.receive
        self.watch = hello.watch
        self.status = StatusState("idle", "jsonl", now)
        self.summary = None
        self.connected_at = now
        self.last_active_at = now
        self.connection = None
        self.grace_call = None
        # Leases this session holds: message id -> (recipient key, lease end ms).
        self.inflight = {}
        self.draining = False
        self.drain_again = False
        # Claimed rows not yet pushed: (connection, rows, lease end, full
        # batch), while the connection's outbound buffer is full.
        self.held = None
        # Set by the broker before it closes the connection itself, so the
        # close that follows is not taken for a network drop.
        self.ending = None

    @property
    def pubkey(self):
        """
        The key others address this session by and that it encrypts with.
        """
        return self.session_pubkey or self.member.pubkey

    @property
    def live(self) -> bool:
        return self.connection is not None

    @property
    def announced(self) -> bool:
        """
        Does this session take part as a peer: announced to others, listed,
        a recipient of its member's messages and of broadcasts? Not for
        C{receive:false} sessions nor for watching ones.
        """
        return self.receive and not self.watch

    def record(self):
        return SessionRecord(
            presence_id=self.presence_id,
            mesh_id=self.mesh.id,
            member_id=self.member.id,
            session_id=self.session_id,
            display_name=self.display_name,
            pid=self.pid,
            cwd=self.cwd,
            connected_at=self.connected_at,
            session_pubkey=self.session_pubkey,
            claude_session_id=self.claude_session_id,
            hostname=self.hostname,
            peer_type=self.peer_type,
            channel=self.channel,
            model=self.model,
            groups=tuple(sorted(self.groups)),
            status=self.status.status,
            status_source=self.status.source,
            status_updated_at=self.status.updated_at,
            summary=self.summary,
            receive=self.receive,
            last_active_at=self.last_active_at,
        )


class MeshState:
    """
    What the broker holds in memory for one mesh: its record, its members and
    its sessions (live or in grace).
    """

    def __init__(self, record, members):
        self.record = record
        self.members = {m.id: m for m in members}
        self.members_by_pubkey = {m.pubkey: m for m in members}
        self.sessions = {}  # presence id -> Session
        # member id -> {presence id -> Session}: routing looks sessions up by
        # member once per delivery.
        self._by_member = {}
        # Session keys seen in this process, so a DM to a session that is away
        # for a while still queues for it: session pubkey -> member id.
        self.session_keys = {}
        # (member id, session id) of sessions that ended: last seen, summary.
        self.departed = {}

    @property
    def id(self):
        return self.record.id

    @property
    def name(self):
        return self.record.name

    def put_member(self, member):
        old = self.members.get(member.id)
        if old is not None and old.pubkey != member.pubkey:
            self.members_by_pubkey.pop(old.pubkey, None)
        self.members[member.id] = member
        self.members_by_pubkey[member.pubkey] = member

    def live_count(self):
        return sum(1 for s in self.sessions.values() if s.live)

    def add_session(self, session):
        self.sessions[session.presence_id] = session
        self._by_member.setdefault(session.member.id, {})[session.presence_id] = session

    def remove_session(self, session):
        """
        Forget a session; C{False} when it was not here.
        """
        if self.sessions.pop(session.presence_id, None) is None:
            return False
        of_member = self._by_member.get(session.member.id)
        if of_member is not None:
            of_member.pop(session.presence_id, None)
            if not of_member:
                del self._by_member[session.member.id]
        return True

    def clear_sessions(self):
        self.sessions.clear()
        self._by_member.clear()

    def sessions_of(self, member_id):
        of_member = self._by_member.get(member_id)
        return list(of_member.values()) if of_member else []


class Broker(service.Service):
    """
    The broker's domain model, a service so its sweeps start and stop with
    the process.
    """

    _log = Logger()

    def __init__(self, store, clock, settings, metrics=None):
        self.store = store
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.writes = GroupCommit(store, clock, metrics)
        self._meshes = {}
        self._loading = {}
        self._send_buckets = TokenBuckets(
            clock, settings.send_rate_limit_burst, settings.send_rate_limit_per_min)
        self._hook_buckets = TokenBuckets(
            clock, settings.hook_rate_limit_per_min, settings.hook_rate_limit_per_min)
        # (mesh id, member id, session id) -> (status, received at ms)
        self._pending_hooks = {}
        # session pubkey -> (mesh id, member id) of its binding in the store,
        # for every key a hello proved in this process: a hello presenting
        # a known key costs no store round trip.
        self._session_key_owners = {}
        self._sweeper = None
        # Imported here: membership builds on this module.
        from claudemesh.broker.membership import Membership

        self.membership = Membership(self)

    # -- service -------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self._schedule_sweep()

    def stopService(self):
        """
        Graceful shutdown: every live session is closed with 1001 C{shutting
        down} (its client reconnects with backoff), every session is marked
        closed in the store, and the pending writes are flushed — nothing
        acknowledged is lost. No C{peer_left} goes out: everyone is leaving.
        """
        service.Service.stopService(self)
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        now = self.now_ms()
        closing = 0
        for mesh in self._meshes.values():
            for session in list(mesh.sessions.values()):
                if session.grace_call is not None and session.grace_call.active():
                    session.grace_call.cancel()
                session.grace_call = None
                connection, session.connection = session.connection, None
                session.ending = "shutdown"
                if connection is not None:
                    connection.close(protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTTING_DOWN)
                    closing += 1
                self.writes.close_session(session.presence_id, now)
            mesh.clear_sessions()
        if self.metrics is not None:
            self.metrics.connections_active.set(0)
        d = self.writes.flushed()
        if closing:
            # Give the close frames a moment on the wire before the reactor
            # stops; clients see 1001 rather than a dropped connection.
            d.addCallback(lambda _: task.deferLater(self.clock, SHUTDOWN_CLOSE_WAIT, lambda: None))
        return d

    def store_opened(self):
        """
        The store is open: sessions it still lists as open were left by a
        previous process (their leases go back to the queue).
        """
        d = self.store.close_all_sessions(self.now_ms())

        def closed(count):
            if count:
                self._log.info("closed {count} sessions left open by a previous run",
                               count=count)

        d.addCallback(closed)
        d.addErrback(lambda f: self._log.failure("closing stale sessions failed", f))
        return d

    def _schedule_sweep(self):
        self._sweeper = self.clock.callLater(SWEEP_INTERVAL, self._sweep_step)

    def _sweep_step(self):
        # Each part guards itself: one failure must not stop the others or
        # the next sweep.
        for part in (self.sweep_status, self.sweep_leases, self.sweep_pending_hooks):
            try:
                part()
            except Exception:
                self._log.failure("broker sweep step {part} failed", part=part.__name__)
        self._send_buckets.sweep()
        self._hook_buckets.sweep()
        if self.running:
            self._schedule_sweep()

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # -- meshes ---------------------------------------------------------------

    def load_mesh(self, mesh_id):
        """
        The L{MeshState} of a mesh, loaded from the store on first use; fires
        with C{None} for an unknown mesh.
        """
        mesh = self._meshes.get(mesh_id)
        if mesh is not None:
            return defer.succeed(mesh)
        d = defer.Deferred()
        waiting = self._loading.get(mesh_id)
        if waiting is not None:
            waiting.append(d)
            return d
        # Register the waiter before loading: a store that answers at once
        # (the inline SQLite store of the unit tests) fires loaded() before
        # load() returns.
        self._loading[mesh_id] = [d]

        @defer.inlineCallbacks
        def load():
            record = yield self.store.get_mesh(mesh_id)
            if record is None:
                return None
            members = yield self.store.list_members(mesh_id)
            return MeshState(record, members)

        def loaded(result):
            waiters = self._loading.pop(mesh_id, [])
            if result is not None:
                result = self._meshes.setdefault(mesh_id, result)
            for waiter in waiters:
                waiter.callback(result)

        def failed(f):
            waiters = self._loading.pop(mesh_id, [])
            for waiter in waiters:
                waiter.errback(f)

        load().addCallbacks(loaded, failed)
        return d

    def cached_mesh(self, mesh_id):
        return self._meshes.get(mesh_id)

    # -- hello ------------------------------------------------------------------

    @defer.inlineCallbacks
    def hello(self, connection, hello):
        """
        Authenticate a hello and attach the connection to its session.

        @return: a L{Deferred} firing with C{(session, hello_ack)}.
        @raise Refusal: with the close to apply after the error frame.
        """
        policy = protocol.CLOSE_POLICY

        def refuse(code, message):
            self.count_rejected(code)
            return Refusal(code, message, close=(policy, code))

        if hello.sessionPubkey is not None and not crypto.is_pubkey(hello.sessionPubkey):
            raise refuse("bad_session_pubkey", "sessionPubkey must be 64 lowercase hex chars")
        limit = self.settings.max_connections_per_mesh
        now = self.now_ms()
        timestamp = hello.timestamp
        if (isinstance(timestamp, bool) or not isinstance(timestamp, int)
                or abs(now - timestamp) > HELLO_SKEW_MS):
            raise refuse("timestamp_skew", "hello rejected: timestamp_skew")
        if not (crypto.is_pubkey(hello.pubkey) and crypto.is_signature(hello.signature)):
            raise refuse("malformed", "hello rejected: malformed")
        if not crypto.verify_hello(hello.pubkey, hello.meshId, hello.memberId, timestamp,
                                   hello.signature):
            raise refuse("bad_signature", "hello rejected: bad_signature")
        mesh = yield self.load_mesh(hello.meshId)
        member = mesh.members_by_pubkey.get(hello.pubkey) if mesh is not None else None
        if member is None or member.id != hello.memberId:
            raise refuse("unauthorized", "pubkey not found in mesh")
        if member.revoked_at is not None:
            self.count_rejected("revoked")
            raise Refusal("revoked", revoked_message(mesh.name),
                          close=(protocol.CLOSE_BANNED, protocol.REASON_BANNED))
        # Capacity only once the hello proved a member: an outsider learns
        # nothing about the mesh, not even that it is full (issue 11).
        if limit and mesh.live_count() >= limit:
            raise refuse("capacity", "mesh at connection capacity")
        if hello.sessionPubkey is not None:
            proof = crypto.session_proof_string(mesh.id, member.pubkey, hello.sessionPubkey)
            if not (hello.sessionSignature and crypto.is_signature(hello.sessionSignature)
                    and crypto.verify(member.pubkey, proof, hello.sessionSignature)):
                raise refuse("bad_session_pubkey", "sessionSignature does not prove sessionPubkey")
            owner = yield self._bind_session_key(mesh, member, hello.sessionPubkey, now)
            if owner != (mesh.id, member.id):
                # Any member can sign a proof for any key; only the first
                # member to prove a key owns it (issue 11: a second claimant
                # was handed the owner's queued DMs).
                raise refuse("bad_session_pubkey", "sessionPubkey belongs to another member")
            # Binding the key waited for the store: others may have taken
            # the last slots meanwhile.
            if limit and mesh.live_count() >= limit:
                raise refuse("capacity", "mesh at connection capacity")
        display_name = member.display_name
        if hello.displayName:
            display_name = hello.displayName

        session, restored = self._attach(mesh, member, hello, connection, display_name, now)
        if self.metrics is not None:
            self.metrics.connections_total.inc()
            self.metrics.connections_active.inc()
        ack = {
            "type": "hello_ack",
            "presenceId": session.presence_id,
            "meshId": mesh.id,
            "meshName": mesh.name,
            "memberId": member.id,
            "memberDisplayName": display_name,
            "role": member.role,
            "serverTime": now,
            "statusTtlSeconds": self.settings.status_ttl_seconds,
            "hookFreshWindowSeconds": self.settings.hook_fresh_window_seconds,
        }
        if restored:
            ack["restored"] = True
        if session.watch:
            ack["watch"] = True
        return session, ack

    def _bind_session_key(self, mesh, member, session_pubkey, now):
        """
        The (mesh id, member id) that C{session_pubkey} belongs to, binding
        it to C{member} of C{mesh} when nobody holds it yet.
        """
        owner = self._session_key_owners.get(session_pubkey)
        if owner is not None:
            return defer.succeed(owner)
        d = self.store.bind_session_key(
            SessionKeyBinding(session_pubkey, mesh.id, member.id, now))

        def bound(binding):
            owner = (binding.mesh_id, binding.member_id)
            self._session_key_owners[session_pubkey] = owner
            return owner

        return d.addCallback(bound)

    def forget_member_keys(self, mesh, member_id):
        """
        A member left (the store dropped its session key bindings): forget
        its keys here too.
        """
        for key in [k for k, owner in mesh.session_keys.items() if owner == member_id]:
            del mesh.session_keys[key]
            self._session_key_owners.pop(key, None)

    def _attach(self, mesh, member, hello, connection, display_name, now):
        """
        Find or make the session of this hello and give it the connection.
        Returns C{(session, restored)}; C{restored} is true when an existing
        session (in grace, or replaced) took the connection.
        """
        existing = None
        for s in mesh.sessions_of(member.id):
            if s.session_id == hello.sessionId:
                existing = s
                break
        if existing is not None:
            old = existing.connection
            if old is not None:
                # Same (mesh, member, session id): another process took over.
                existing.connection = None
                # What the old connection held goes to the new one (or a
                # sibling) once the release is stored.
                self._release_and_drain(existing)
                existing.inflight.clear()
                self._drop_held(existing)
                old.close(protocol.CLOSE_NORMAL, protocol.REASON_SESSION_REPLACED)
                if self.metrics is not None:
                    self.metrics.connections_active.dec()
            if existing.grace_call is not None and existing.grace_call.active():
                existing.grace_call.cancel()
            existing.grace_call = None
            existing.connection = connection
            existing.display_name = display_name
            existing.pid = hello.pid
            existing.cwd = hello.cwd
            existing.claude_session_id = hello.claudeSessionId
            existing.last_active_at = now
            existing.ending = None
            if hello.groups:
                existing.groups = dict(hello.groups)
            if hello.sessionPubkey:
                existing.session_pubkey = hello.sessionPubkey
                mesh.session_keys[hello.sessionPubkey] = member.id
            self.writes.update_session(existing.presence_id, {
                "display_name": display_name, "last_active_at": now,
                "groups": tuple(sorted(existing.groups))})
            self._apply_pending_hook(existing)
            return existing, True

        session = Session(mesh, member, hello, new_id(), now, display_name)
        session.connection = connection
        mesh.add_session(session)
        if session.session_pubkey:
            mesh.session_keys[session.session_pubkey] = member.id
        self._apply_pending_hook(session)
        self.writes.open_session(session.record())
        if session.announced:
            departed = mesh.departed.pop((member.id, session.session_id), None)
            event = "peer_returned" if departed is not None else "peer_joined"
            data = self._peer_event_data(session)
            if departed is not None:
                data["lastSeenAt"] = iso_millis(departed[0])
                data["summary"] = departed[1]
            self._broadcast_system(session, event, data)
            self.writes.audit(AuditEvent(mesh.id, "peer_joined", member.id, {
                "pubkey": session.pubkey, "groups": sorted(session.groups),
                "restored": departed is not None}, now))
        return session, False

    def session_ready(self, session):
        """
        The hello_ack is on its way: hand the session what waits for it.
        """
        if session.watch:
            self._drain(session)
        elif session.receive:
            self._drain_member(session.mesh, session.member.id)

    # -- connection loss, grace, departure -------------------------------------

    def connection_lost(self, session, connection, clean):
        """
        The connection of C{session} closed. A clean close by the client ends
        the session at once; anything else starts the grace window.
        """
        if session.connection is not connection:
            # A replaced connection, or one the broker already ended.
            return
        session.connection = None
        if self.metrics is not None:
            self.metrics.connections_active.dec()
        ending = session.ending
        session.inflight.clear()
        self._drop_held(session)
        if (ending is not None and ending != "grace") or (clean and ending is None):
            self._end_session(session)
            return
        # Grace: leases go back at once so a sibling session can take member
        # deliveries; presence stays until the window ends.
        session.grace_call = self.clock.callLater(
            self.settings.grace_seconds, self._grace_over, session)
        self._release_and_drain(session)

    def _release_and_drain(self, session):
        """
        Give back the leases of C{session}, then, once that is stored (a
        claim made earlier would not see them), offer its member's
        deliveries to the member's live sessions.
        """
        mesh, member_id = session.mesh, session.member.id
        d = self.writes.release_leases(session.presence_id)
        d.addCallback(lambda _: self._drain_member(mesh, member_id))
        return d

    def _grace_over(self, session):
        session.grace_call = None
        if session.connection is None:
            self._end_session(session)

    def _end_session(self, session):
        mesh = session.mesh
        if not mesh.remove_session(session):
            return
        if session.grace_call is not None and session.grace_call.active():
            session.grace_call.cancel()
        session.grace_call = None
        now = self.now_ms()
        self.writes.close_session(session.presence_id, now)
        if session.announced:
            mesh.departed[(session.member.id, session.session_id)] = (now, session.summary)
            if len(mesh.departed) > 10_000:
                mesh.departed.pop(next(iter(mesh.departed)))
            self._broadcast_system(session, "peer_left", self._peer_event_data(session))
            self.writes.audit(AuditEvent(mesh.id, "peer_left", session.member.id, {}, now))
        self._release_and_drain(session)

    def end_connection(self, session, code, reason, ending):
        """
        Close a session's connection on the broker's initiative. C{ending}
        says what happens to the session: C{"grace"} (disconnect: it may
        come back) or anything else, such as C{"kicked"}, C{"banned"} or
        C{"left"} (it ends now).
        """
        session.ending = ending
        connection = session.connection
        if connection is not None:
            connection.close(code, reason)
            # Do not wait for the close handshake: the session's fate is
            # decided now.
            self.connection_lost(session, connection, clean=False)
        elif ending != "grace":
            self._end_session(session)

    # -- presence events -------------------------------------------------------

    def _peer_event_data(self, session):
        return {
            "name": session.display_name,
            "pubkey": session.pubkey,
            "memberPubkey": session.member.pubkey,
            "sessionId": session.session_id,
            "groups": sorted(session.groups),
        }

    def _broadcast_system(self, about, event, data, watchers_only=False):
        """
        Push a system event about session C{about}: to the live receiving
        sessions of other members, and to every watching session but
        C{about} (watchers see their own member's sessions too). With
        C{watchers_only}, to the watching sessions alone.
        """
        frame = {
            "type": "push",
            "subtype": "system",
            "event": event,
            "eventData": data,
            "messageId": str(uuid.uuid4()),
            "meshId": about.mesh.id,
            "senderPubkey": "system",
            "priority": "low",
            "nonce": "",
            "ciphertext": "",
            "createdAt": iso_millis(self.now_ms()),
        }
        payload = None
        for other in about.mesh.sessions.values():
            if not other.live or other is about:
                continue
            if other.watch or (not watchers_only and other.announced
                               and other.member.id != about.member.id):
                if payload is None:
                    payload = protocol.encode(frame)
                try:
                    other.connection.send_encoded(payload)
                except Exception as e:
                    # One connection that cannot take it must not keep the
                    # event from the others.
                    self._log.warn("could not send {event} to a session: {error}",
                                   event=event, error=str(e)[:200])

    def _status_event(self, session):
        """
        Tell the watching sessions that C{session}'s status, summary or
        groups changed (C{peer_status}, carrying its C{peers_list} row).
        """
        if session.announced:
            row = self._peer_row(session)
            budget = self.settings.max_message_bytes
            if budget and pages.size_of(row) > budget:
                # As in peers_list: a row too large for a frame goes shortened.
                row = pages.shortened(row)
            self._broadcast_system(session, "peer_status", row, watchers_only=True)

    # -- peers, status, summary, groups ----------------------------------------

    def list_peers(self, session, frame):
        self.touch(session)
        listed = [s for s in session.mesh.sessions.values() if s.announced or s is session]
        return self.page({"type": "peers_list"}, "peers", listed, self._peer_row,
                         lambda s: (s.connected_at, s.order), (int, int), frame.cursor)

    def page(self, reply, field, rows, entry_of, key_of, shape, cursor):
        """
        C{reply} with the page of C{rows} after C{cursor} that fits in a
        frame (L{claudemesh.broker.pages}).

        @raise Refusal: C{malformed} for a cursor this broker did not make.
        """
        try:
            return pages.page(reply, field, rows, self.settings.max_message_bytes, entry_of,
                              key_of, shape, cursor)
        except pages.BadCursor as e:
            raise Refusal("malformed", str(e)) from None

    def _peer_row(self, s):
        """
        The C{peers_list} entry of session C{s}.
        """
        peer = {
            "pubkey": s.pubkey,
            "memberPubkey": s.member.pubkey,
            "displayName": s.display_name,
            "role": s.member.role,
            "status": s.status.status,
            "summary": s.summary,
            "groups": [_group_entry(name, role) for name, role in sorted(s.groups.items())],
            "sessionId": s.session_id,
            "connectedAt": iso_millis(s.connected_at),
            "cwd": s.cwd,
            "online": s.live,
            "statusSource": s.status.source,
            "statusUpdatedAt": iso_millis(s.status.updated_at),
        }
        for key, value in (("hostname", s.hostname), ("peerType", s.peer_type),
                           ("channel", s.channel), ("model", s.model)):
            if value is not None:
                peer[key] = value
        return peer

    def _own_targets(self, session, session_id, all_sessions):
        if all_sessions:
            # "All my sessions" are the member's peers, not a watching UI.
            return [s for s in session.mesh.sessions_of(session.member.id) if not s.watch]
        if session_id is None or session_id == session.session_id:
            return [session]
        for s in session.mesh.sessions_of(session.member.id):
            if s.session_id == session_id:
                return [s]
        raise Refusal("not_found", "no session %r of yours is connected" % (session_id,))

    def set_status(self, session, frame):
        self.touch(session)
        for target in self._own_targets(session, frame.sessionId, frame.all):
            self._signal_status(target, frame.status, frame.source)

    def _signal_status(self, session, status, source):
        now = self.now_ms()
        window = self.settings.hook_fresh_window_seconds * 1000
        new = apply_signal(session.status, status, source, now, window)
        if new is None:
            return False
        self._set_status_state(session, new)
        return True

    def _set_status_state(self, session, new):
        before = session.status.status
        session.status = new
        self.writes.update_session(session.presence_id, {
            "status": new.status, "status_source": new.source,
            "status_updated_at": new.updated_at})
        self._status_event(session)
        if new.status == "idle" and before != "idle":
            # Held deliveries go out when the recipient turns idle.
            self._drain(session)

    def set_summary(self, session, frame):
        self.touch(session)
        for target in self._own_targets(session, frame.sessionId, frame.all):
            target.summary = frame.summary
            self.writes.update_session(target.presence_id, {"summary": frame.summary})
            self._status_event(target)

    def join_group(self, session, frame):
        self.touch(session)
        if frame.name not in session.groups and len(session.groups) >= protocol.MAX_GROUPS:
            # The same cap as a hello's: a session's groups go into every
            # peers_list row and presence event about it (issue 11).
            raise Refusal("too_many_groups", "a session holds at most %d groups; leave one "
                          "first" % (protocol.MAX_GROUPS,))
        session.groups[frame.name] = frame.role
        self.writes.update_session(session.presence_id, {"groups": tuple(sorted(session.groups))})
        self._status_event(session)
        # Deliveries to @that-group may be waiting for a session in it.
        self._drain(session)

    def leave_group(self, session, frame):
        self.touch(session)
        if session.groups.pop(frame.name, _ABSENT) is not _ABSENT:
            self.writes.update_session(
                session.presence_id, {"groups": tuple(sorted(session.groups))})
            self._status_event(session)

    def touch(self, session):
        """
        Note an application frame from this session ("stale" counts from it).
        """
        session.last_active_at = self.now_ms()

    # -- sweeps ----------------------------------------------------------------

    def sweep_status(self):
        now = self.now_ms()
        ttl = self.settings.status_ttl_seconds * 1000
        for mesh in list(self._meshes.values()):
            for session in list(mesh.sessions.values()):
                new = decay(session.status, now, ttl)
                if new is not None:
                    self._set_status_state(session, new)

    def sweep_leases(self):
        now = self.now_ms()
        for mesh in list(self._meshes.values()):
            for session in list(mesh.sessions.values()):
                expired = [mid for mid, (_, until) in session.inflight.items() if until <= now]
                if not expired:
                    continue
                for mid in expired:
                    del session.inflight[mid]
                if self.metrics is not None:
                    self.metrics.redeliveries.inc(len(expired))
                self._drain_member(mesh, session.member.id)

    def sweep_pending_hooks(self):
        horizon = self.now_ms() - self.settings.pending_hook_seconds * 1000
        for key in [k for k, (_, at) in self._pending_hooks.items() if at < horizon]:
            del self._pending_hooks[key]

    # -- sending ------------------------------------------------------------------

    def send(self, session, frame):
        """
        Store a message and its deliveries, then acknowledge it.

        @return: a L{Deferred} firing with the C{ack} frame.
        """
        self.touch(session)
        client_id = frame.id

        def refused(reason, error):
            if self.metrics is not None:
                self.metrics.messages_rejected.labels(reason).inc()
            return defer.succeed({"type": "ack", "id": client_id or "", "messageId": "",
                                  "queued": False, "error": error})

        settings = self.settings
        if not self._send_buckets.take(session.member.id):
            return refused("rate_limit", "rate_limit: max %d msg/min (burst %d) — slow down" % (
                settings.send_rate_limit_per_min, settings.send_rate_limit_burst))
        size = len(frame.ciphertext) + len(frame.nonce) + len(frame.targetSpec)
        if settings.max_message_bytes and size > settings.max_message_bytes:
            return refused("too_large", "payload too large: %d bytes > MAX_MESSAGE_BYTES=%d" % (
                size, settings.max_message_bytes))
        deliveries = self._route(session, frame.targetSpec, frame.priority)
        if deliveries is None:
            return refused("unknown_target", "unknown_target")
        now = self.now_ms()
        message = NewMessage(
            id=new_id(),
            mesh_id=session.mesh.id,
            sender_member_id=session.member.id,
            sender_pubkey=session.pubkey,
            sender_member_pubkey=session.member.pubkey,
            target_spec=frame.targetSpec,
            priority=frame.priority,
            nonce=frame.nonce,
            ciphertext=frame.ciphertext,
            created_at=now,
            expires_at=now + settings.message_ttl_seconds * 1000,
            deliveries=tuple(d for d, _ in deliveries),
            client_id=client_id,
        )
        audit = AuditEvent(session.mesh.id, "message_sent", session.member.id, {
            "targetSpec": frame.targetSpec, "priority": frame.priority,
            "bytes": len(frame.ciphertext)}, now)
        d = self.writes.enqueue(message, audit)

        def committed(result):
            if not result.duplicate:
                if self.metrics is not None:
                    self.metrics.messages_routed.labels(frame.priority).inc()
                self._push_fresh(message, result.seq, deliveries)
            return {"type": "ack", "id": client_id or "", "messageId": result.message_id,
                    "queued": True}

        def failed(f):
            self._log.failure("storing a message failed", f)
            if self.metrics is not None:
                self.metrics.messages_rejected.labels("store_unavailable").inc()
            return {"type": "ack", "id": client_id or "", "messageId": "", "queued": False,
                    "error": "store_unavailable: the broker cannot store messages right now"}

        return d.addCallbacks(committed, failed)

    def _route(self, sender, target, priority):
        """
        The deliveries of a message to C{target}, each paired with the live
        session it is leased to at once (or C{None}); C{None} for an unknown
        direct target.
        """
        mesh = sender.mesh
        lease_until = self.now_ms() + self.settings.lease_seconds * 1000
        result = []

        def leased(member_id, session_pubkey=None, group=None):
            taker = self._taker(mesh, sender, member_id, session_pubkey, group, priority)
            now_taken = isinstance(taker, Session)
            delivery = NewDelivery(
                member_id=member_id, session_pubkey=session_pubkey, group_name=group,
                lease_session=taker.presence_id if now_taken else None,
                lease_until=lease_until if now_taken else None)
            result.append((delivery, taker))

        if target in ("*", "@all") or target.startswith("@"):
            group = None if target in ("*", "@all") else target[1:]
            if group is not None and not protocol.is_valid_group(group):
                return None
            members = set()
            for s in mesh.sessions.values():
                if s.announced and s.member.id != sender.member.id:
                    if group is None or any(group_matches(g, group) for g in s.groups):
                        members.add(s.member.id)
            for member_id in sorted(members):
                leased(member_id, group=group)
            return result
        member = mesh.members_by_pubkey.get(target)
        if member is not None and member.revoked_at is None:
            leased(member.id)
            return result
        owner_id = mesh.session_keys.get(target)
        if owner_id is not None:
            owner = mesh.members.get(owner_id)
            if owner is not None and owner.revoked_at is None:
                leased(owner_id, session_pubkey=target)
                return result
        return None

    def _taker(self, mesh, sender, member_id, session_pubkey, group, priority):
        """
        The live session that takes a new delivery right away, or C{None} to
        leave it queued: the most recently active session of the recipient
        that may receive this priority and has no claim running (which would
        put this message before older ones). When one has a claim running,
        C{_CLAIM_AFTER_COMMIT}: the delivery stays queued and is claimed
        once the message is committed.
        """
        best = None
        for s in mesh.sessions_of(member_id):
            if not s.live or s is sender:
                continue
            # A watching session takes only what is addressed to its own
            # session key.
            if not (s.announced or (s.watch and session_pubkey is not None)):
                continue
            if session_pubkey is not None and s.session_pubkey != session_pubkey:
                continue
            if group is not None and not any(group_matches(g, group) for g in s.groups):
                continue
            if s.draining:
                # A claim is running; it may have read the store before this
                # message is in it. Claim again once the message committed.
                return _CLAIM_AFTER_COMMIT
            if not may_receive(s.status.status, priority):
                continue
            if best is None or s.last_active_at > best.last_active_at:
                best = s
        return best

    def _push_fresh(self, message, seq, deliveries):
        frame = _push_frame(message.id, message.mesh_id, message.sender_pubkey,
                            message.sender_member_pubkey, message.target_spec,
                            message.priority, message.nonce, message.ciphertext,
                            message.created_at, seq)
        payload = None
        for delivery, taker in deliveries:
            if taker is _CLAIM_AFTER_COMMIT:
                mesh = self._meshes.get(message.mesh_id)
                if mesh is not None:
                    self._drain_member(mesh, delivery.member_id)
                continue
            if taker is None:
                continue
            if taker.connection is None:
                # It went away between routing and commit: release the lease
                # this batch stored, and hand the delivery on.
                self._release_and_drain(taker)
                continue
            if payload is None:
                payload = protocol.encode(frame)
            # Held as in flight even when the push fails: the lease sweep
            # then offers it again when the lease ends.
            taker.inflight[message.id] = (delivery.recipient_key, delivery.lease_until)
            self._push(taker.connection, payload, message.id)

    # -- claims (queued deliveries) ---------------------------------------------

    def _drain_member(self, mesh, member_id):
        """
        Offer the member's queued deliveries to its live sessions, most
        recently active first, one after another so the most recent one that
        may take a delivery gets it.
        """
        sessions = [s for s in mesh.sessions_of(member_id)
                    if s.live and (s.receive or s.watch)]
        sessions.sort(key=lambda s: s.last_active_at, reverse=True)
        d = defer.succeed(None)
        for s in sessions:
            d.addCallback(lambda _, s=s: self._drain(s))
        return d

    def _drain(self, session):
        if not (session.live and (session.announced or session.watch)):
            return defer.succeed(None)
        if session.watch and not session.session_pubkey:
            return defer.succeed(None)
        if session.draining:
            session.drain_again = True
            return defer.succeed(None)
        session.draining = True
        session.drain_again = False
        connection = session.connection
        now = self.now_ms()
        # A watching session takes its own session deliveries only.
        d = self.store.claim_deliveries(ClaimRequest(
            member_id=session.member.id, session_pubkey=session.session_pubkey,
            presence_id=session.presence_id, groups=tuple(expand_groups(session.groups)),
            priorities=tuple(DELIVERABLE[session.status.status]), now=now,
            lease_ms=self.settings.lease_seconds * 1000, limit=CLAIM_BATCH,
            member_deliveries=not session.watch))

        def claimed(rows):
            session.draining = False
            if session.connection is not connection or connection is None:
                if rows:
                    self._release_and_drain(session)
                return None
            lease_until = now + self.settings.lease_seconds * 1000
            # Still draining until every row is pushed: a fresh message must
            # not overtake the ones held here.
            session.draining = True
            session.held = (connection, collections.deque(rows), lease_until,
                            len(rows) >= CLAIM_BATCH)
            return self._push_held(session)

        def failed(f):
            session.draining = False
            self._log.failure("claiming deliveries failed", f)

        return d.addCallbacks(claimed, failed)

    def _push_held(self, session):
        """
        Push the claimed rows of C{session} while its connection takes them.
        A connection whose outbound buffer is full (C{paused}: the peer reads
        slower than a claim batch arrives) gets the rest when it drained
        (L{connection_writable}); the next batch is claimed only after. So a
        peer that reads fine is never taken for a slow consumer because its
        backlog is large, and memory stays bounded by one claim batch.
        """
        connection, rows, lease_until, full = session.held
        while rows:
            if getattr(connection, "paused", False):
                return None
            row = rows.popleft()
            if row.attempts > 1 and self.metrics is not None:
                self.metrics.redeliveries.inc()
            payload = protocol.encode(_push_frame(
                row.message_id, row.mesh_id, row.sender_pubkey, row.sender_member_pubkey,
                row.target_spec, row.priority, row.nonce, row.ciphertext,
                row.created_at, row.seq))
            session.inflight[row.message_id] = (row.recipient_key, lease_until)
            self._push(connection, payload, row.message_id)
        session.held = None
        session.draining = False
        if full or session.drain_again:
            return self._drain(session)
        return None

    def _push(self, connection, payload, message_id):
        """
        Send one encoded push.

        A push that cannot be sent (the WebSocket layer refuses a frame
        larger than its limit, say after the operator lowered
        C{--max-message-bytes} while it was queued) must not stop the pushes
        behind it: it is skipped, its delivery stays leased, and it is
        offered again when the lease ends — nothing is lost, and the outbox
        keeps moving (issue 11).
        """
        try:
            connection.send_encoded(payload)
        except Exception as e:
            self._log.warn("could not push message {message_id} ({size} bytes): {error}",
                           message_id=message_id, size=len(payload), error=str(e)[:200])
            if self.metrics is not None:
                self.metrics.push_failures.inc()
            return
        if self.metrics is not None:
            self.metrics.pushes.inc()

    def connection_writable(self, session):
        """
        The connection of C{session} drained its outbound buffer: push the
        claimed rows still held for it.
        """
        held = session.held
        if held is not None and held[0] is session.connection:
            self._push_held(session)

    def _drop_held(self, session):
        """
        The connection the held rows were for is gone; their leases are
        released with the session's.
        """
        if session.held is not None:
            session.held = None
            session.draining = False

    def client_ack(self, session, frame):
        self.touch(session)
        member_id = session.member.id
        held = session.inflight.pop(frame.messageId, None)
        if held is not None:
            self.writes.ack(frame.messageId, member_id, held[0])
            return
        # Not (or no longer) leased here: still confirm what this session
        # may confirm — its member's delivery or its own session delivery.
        # The store ignores unknown ones and those of other members, so this
        # stays a no-op for unknown, repeated or foreign ids. A watching
        # session confirms nothing of its member's.
        if not session.watch:
            self.writes.ack(frame.messageId, member_id, member_id)
        if session.session_pubkey:
            self.writes.ack(frame.messageId, member_id, session.session_pubkey)

    @defer.inlineCallbacks
    def message_status(self, session, frame):
        self.touch(session)
        message = yield self.store.get_message(frame.messageId)
        if message is None or message.mesh_id != session.mesh.id:
            raise Refusal("not_found", "message not found")
        rows = yield self.store.message_deliveries(frame.messageId)
        mesh = session.mesh

        def recipient(row):
            member = mesh.members.get(row.member_id)
            name = member.display_name if member is not None else "unknown"
            if row.recipient_kind == "session":
                pubkey = row.recipient_key
            else:
                pubkey = member.pubkey if member is not None else ""
            state = "queued" if row.state in ("queued", "leased") else row.state
            return {"name": name, "pubkey": pubkey, "status": state}

        return self.page({"type": "message_status_result", "messageId": message.id,
                          "targetSpec": message.target_spec}, "recipients", rows, recipient,
                         lambda row: (row.recipient_key,), (str,), frame.cursor)

    # -- audit -----------------------------------------------------------------------

    def _require_auditor(self, session):
        if session.member.role not in ("owner", "admin"):
            raise Refusal("forbidden", "only owner or admin can read the audit log")

    @defer.inlineCallbacks
    def audit_query(self, session, frame):
        self.touch(session)
        self._require_auditor(session)
        entries, total = yield self.store.audit_entries(
            session.mesh.id, frame.limit, frame.offset, frame.eventType)
        names = session.mesh.members

        def entry(e):
            return {
                "seq": e.seq, "eventType": e.event_type,
                "actor": names[e.actor].display_name if e.actor in names
                else (e.actor or "system"),
                "payload": e.payload, "hash": e.hash, "createdAt": iso_millis(e.created_at)}

        reply = pages.fill({"type": "audit_result", "total": total}, "entries", entries,
                           self.settings.max_message_bytes, entry, next_field="nextOffset",
                           next_value=lambda taken: frame.offset + taken)
        if "nextOffset" not in reply and frame.offset + len(entries) < total:
            # A full page (limit rows) with more after it.
            reply["nextOffset"] = frame.offset + len(entries)
        return reply

    @defer.inlineCallbacks
    def audit_verify(self, session, frame):
        self.touch(session)
        self._require_auditor(session)
        yield self.writes.flushed()
        result = yield self.store.verify_chain(session.mesh.id)
        reply = {"type": "audit_verify_result", "valid": result.valid, "entries": result.entries}
        if result.broken_at is not None:
            reply["brokenAt"] = result.broken_at
        return reply

    # -- the status hook -------------------------------------------------------------

    @defer.inlineCallbacks
    def hook_set_status(self, mesh_id, pubkey, timestamp, signature, body):
        """
        A signed status report from the Claude Code hook (C{POST
        /hook/set-status}).

        @return: a L{Deferred} firing with the result object.
        @raise Refusal: C{unauthorized}, C{rate_limited} or C{malformed};
            nothing changes.
        """
        now = self.now_ms()
        try:
            timestamp = int(timestamp)
        except (TypeError, ValueError):
            raise Refusal("unauthorized", "missing or bad X-Claudemesh-Timestamp") from None
        if abs(now - timestamp) > HELLO_SKEW_MS:
            raise Refusal("unauthorized", "stale timestamp")
        if not (crypto.is_pubkey(pubkey) and crypto.is_signature(signature or "")):
            raise Refusal("unauthorized", "missing or malformed signature headers")
        if not crypto.verify(pubkey, crypto.hook_string(mesh_id, timestamp, body), signature):
            raise Refusal("unauthorized", "bad signature")
        mesh = yield self.load_mesh(mesh_id)
        member = mesh.members_by_pubkey.get(pubkey) if mesh is not None else None
        if member is None or member.revoked_at is not None:
            raise Refusal("unauthorized", "not a member of this mesh")
        if not self._hook_buckets.take(pubkey):
            raise Refusal("rate_limited", "rate limited")
        payload = _parse_hook_body(body)
        status = payload["status"]
        cwd, pid, session_id = payload["cwd"], payload["pid"], payload["session_id"]
        # A watching session (claudemesh ui) is nobody's Claude Code session.
        mine = [s for s in mesh.sessions_of(member.id) if not s.watch]
        target = None
        if session_id:
            # The caller's own sessions only: session ids are client-chosen
            # and unique per member at best, so another member's session
            # with the same id (by chance, or squatted in its hello to
            # block this one: issue 11) must neither match nor refuse.
            named = [s for s in mine if session_id in (s.session_id, s.claude_session_id)]
            target = max(named, key=lambda s: s.connected_at, default=None)
        if target is None and pid and cwd:
            candidates = [s for s in mine if s.pid == pid and s.cwd == cwd]
            target = max(candidates, key=lambda s: s.connected_at, default=None)
        if target is None and cwd:
            candidates = [s for s in mine if s.cwd == cwd]
            target = max(candidates, key=lambda s: s.connected_at, default=None)
        if target is None:
            if session_id:
                self._pending_hooks[(mesh.id, member.id, session_id)] = (status, now)
            return {"ok": True, "pending": True}
        self._signal_status(target, status, "hook")
        return {"ok": True, "presence_id": target.presence_id, "status": target.status.status}

    def _apply_pending_hook(self, session):
        now = self.now_ms()
        horizon = now - self.settings.pending_hook_seconds * 1000
        for key in (session.session_id, session.claude_session_id):
            if not key:
                continue
            pending = self._pending_hooks.pop((session.mesh.id, session.member.id, key), None)
            if pending is not None and pending[1] >= horizon:
                self._signal_status(session, pending[0], "hook")
                return

    # -- metrics -------------------------------------------------------------------

    def count_rejected(self, reason):
        if self.metrics is not None:
            self.metrics.connections_rejected.labels(reason).inc()


_ABSENT = object()
# What Broker._taker answers when a recipient session is claiming already.
_CLAIM_AFTER_COMMIT = object()


def _group_entry(name, role):
    entry = {"name": name}
    if role:
        entry["role"] = role
    return entry


def _push_frame(message_id, mesh_id, sender_pubkey, sender_member_pubkey, target_spec,
                priority, nonce, ciphertext, created_at, seq):
    return {
        "type": "push",
        "messageId": message_id,
        "meshId": mesh_id,
        "senderPubkey": sender_pubkey,
        "senderMemberPubkey": sender_member_pubkey,
        "targetSpec": target_spec,
        "priority": priority,
        "nonce": nonce,
        "ciphertext": ciphertext,
        "createdAt": iso_millis(created_at),
        "seq": seq,
    }


def _parse_hook_body(body):
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refusal("malformed", "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise Refusal("malformed", "body must be a JSON object")
    status = payload.get("status")
    if status not in protocol.STATUSES:
        raise Refusal("malformed", "field 'status' must be one of idle, working, dnd")
    cwd = payload.get("cwd", "")
    if (not isinstance(cwd, str) or len(cwd) > protocol.MAX_PATH_LENGTH
            or protocol.has_nul(cwd)):
        raise Refusal("malformed", "field 'cwd' must be a string without NUL")
    pid = payload.get("pid", 0)
    if pid is None:
        pid = 0
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 2**31:
        raise Refusal("malformed", "field 'pid' must be an integer from 0 to 2^31-1")
    session_id = payload.get("session_id")
    if session_id is not None and not (isinstance(session_id, str) and len(session_id) <= 128
                                       and not protocol.has_nul(session_id)):
        raise Refusal("malformed", "field 'session_id' must be a string without NUL")
    return {"status": status, "cwd": cwd, "pid": pid, "session_id": session_id}
