"""
Presence: who is connected. A C{hello} is authenticated and attached to its
session; connections come and go; sessions enter grace, come back or end;
the mesh hears C{peer_joined}, C{peer_returned} and C{peer_left}.

Session replacement is keyed on (mesh, member, session id): a new hello
with the same triple takes the session over and closes the older connection
with 1000 C{session_replaced}. After an abnormal close (or a C{disconnect})
a session stays I{in grace} for C{grace_seconds}: a hello of the same
session within it reattaches silently. A clean client close, a kick and a
ban end it at once.
"""

from twisted.internet import defer, task
from twisted.logger import Logger

from claudemesh import crypto, protocol
from claudemesh.audit import iso_millis
from claudemesh.broker import pages
from claudemesh.broker.events import broadcast_system, peer_event_data
from claudemesh.broker.ids import new_id
from claudemesh.broker.sessions import Session
from claudemesh.broker.status import peer_row
from claudemesh.store.records import AuditEvent, SessionKeyBinding

# How long a shutdown waits after sending 1001 close frames.
SHUTDOWN_CLOSE_WAIT = 0.5
# How long a clustered hello waits for its session's row to commit.
HELLO_COMMIT_WAIT = 2.0
# How many departed sessions a mesh remembers for peer_returned.
DEPARTED_KEPT = 10_000


class Presence:
    """
    The presence part of the broker core.

    @param delivery: told when a session's connection comes and goes (its
        outbox, its leases).
    @param hooks: asked for a status report that arrived before the hello.
    @param hello_fields: C{hello_fields(mesh, member)}, a L{Deferred} of
        what else the C{hello_ack} carries (issue 17: the key epoch,
        L{claudemesh.broker.meshkeys.MeshKeys.hello_fields}).
    """

    _log = Logger()

    def __init__(self, meshes, writes, store, delivery, hooks, clock, settings, replays,
                 metrics=None, hello_fields=lambda mesh, member: defer.succeed({}),
                 node_id="", notify=lambda kind, mesh_id, **data: None):
        """
        @param replays: the L{IReplayMemory} each signed hello is used once
            through.
        @param node_id: this node's id (issue 15), in each session's row.
        @param notify: queues a notice for the other nodes of the cluster
            (L{claudemesh.broker.cluster}): C{sess} when a session comes,
            changes or goes, C{repl} when a hello here replaces a session
            another node holds.
        """
        self._replays = replays
        self._notify = notify
        self._node_id = node_id
        self._hello_fields = hello_fields
        self._meshes = meshes
        self._writes = writes
        self._store = store
        self._delivery = delivery
        self._hooks = hooks
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        # session pubkey -> (mesh id, member id) of its binding in the store,
        # for every key a hello proved in this process: a hello presenting
        # a known key costs no store round trip.
        self._session_key_owners = {}

    def _now(self):
        return int(self._clock.seconds() * 1000)

    def count_rejected(self, reason):
        if self._metrics is not None:
            self._metrics.connections_rejected.labels(reason).inc()

    # -- hello ------------------------------------------------------------------

    @defer.inlineCallbacks
    def hello(self, connection, hello):
        """
        Authenticate a hello and attach the connection to its session.

        @return: a L{Deferred} firing with C{(session, hello_ack)}.
        @raise protocol.Refusal: with the close to apply after the error.
        """
        policy = protocol.CLOSE_POLICY

        def refuse(code, message):
            self.count_rejected(code)
            return protocol.Refusal(code, message, close=(policy, code))

        if hello.sessionPubkey is not None and not crypto.is_pubkey(hello.sessionPubkey):
            raise refuse("bad_session_pubkey", "sessionPubkey must be 64 lowercase hex chars")
        limit = self._settings.max_connections_per_mesh
        now = self._now()
        timestamp = hello.timestamp
        if (isinstance(timestamp, bool) or not isinstance(timestamp, int)
                or abs(now - timestamp) > protocol.SIGNED_SKEW_MS):
            raise refuse("timestamp_skew", "hello rejected: timestamp_skew")
        if not (crypto.is_pubkey(hello.pubkey) and crypto.is_signature(hello.signature)):
            raise refuse("malformed", "hello rejected: malformed")
        if not crypto.verify_hello(hello.pubkey, hello.meshId, hello.memberId, timestamp,
                                   hello.sessionId, hello.signature):
            raise refuse("bad_signature", "hello rejected: bad_signature")
        mesh = yield self._meshes.load(hello.meshId)
        member = mesh.members_by_pubkey.get(hello.pubkey) if mesh is not None else None
        if member is None and mesh is not None and self._meshes.node_id is not None:
            # Joined through another node a moment ago, before its notice
            # arrived here (issue 15): the store knows.
            member = yield self._store.find_member(mesh.id, hello.pubkey)
            if member is not None:
                mesh.put_member(member)
        if member is None or member.id != hello.memberId:
            raise refuse("unauthorized", "pubkey not found in mesh")
        if member.revoked_at is not None:
            self.count_rejected("revoked")
            raise protocol.Refusal("revoked", protocol.revoked_message(mesh.name),
                                   close=(protocol.CLOSE_BANNED, protocol.REASON_BANNED))
        # Each signed hello is good once: replayed within the skew window it
        # would replace its own session (issue 11). Remembered only for
        # members, so outsiders cannot fill the memory.
        fresh = yield self._replays.first_use("hello", hello.pubkey, hello.signature,
                                              timestamp + protocol.SIGNED_SKEW_MS)
        if not fresh:
            raise refuse("replayed", "hello rejected: replayed")
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
        display_name = hello.displayName or member.display_name
        extra = yield self._hello_fields(mesh, member)
        clustered = self._meshes.node_id is not None
        if clustered:
            # The same session open on another node (issue 15), even one
            # whose notice has not arrived: its row says so.
            records = yield self._store.find_open_sessions(mesh.id, member.id, hello.sessionId)
            for record in records:
                if record.node_id != self._node_id and record.presence_id not in mesh.sessions:
                    mesh.put_remote(record)
        session, restored = self._attach(mesh, member, hello, connection, display_name, now)
        if clustered:
            # The hello_ack goes out once the session's row is committed, so
            # a client that goes on to another node is found there (but not
            # later than HELLO_COMMIT_WAIT: a store going down meanwhile must
            # not hold the hello).
            yield self._within(self._writes.flushed(), HELLO_COMMIT_WAIT)
        if self._metrics is not None:
            self._metrics.connections_total.inc()
            self._metrics.connections_active.inc()
        ack = protocol.HelloAck(
            presenceId=session.presence_id, meshId=mesh.id, meshName=mesh.name,
            memberId=member.id, memberDisplayName=display_name, role=member.role,
            serverTime=now, statusTtlSeconds=self._settings.status_ttl_seconds,
            hookFreshWindowSeconds=self._settings.hook_fresh_window_seconds,
            # Clients refuse a bigger frame before sending it (issue 13).
            maxMessageBytes=self._settings.max_message_bytes or None,
            restored=True if restored else None, watch=True if session.watch else None,
            **extra)
        return session, ack.to_wire()

    def _within(self, d, seconds):
        """
        A L{Deferred} firing with C{None} when C{d} does, or after C{seconds}.
        """
        done = defer.Deferred()
        timer = self._clock.callLater(seconds, lambda: None if done.called else done.callback(None))

        def fired(_):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        d.addBoth(fired)
        return done

    def _bind_session_key(self, mesh, member, session_pubkey, now):
        """
        The (mesh id, member id) that C{session_pubkey} belongs to, binding
        it to C{member} of C{mesh} when nobody holds it yet.
        """
        owner = self._session_key_owners.get(session_pubkey)
        if owner is not None:
            return defer.succeed(owner)
        d = self._store.bind_session_key(
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
        existing = next(
            (s for s in mesh.sessions_of(member.id) if s.session_id == hello.sessionId), None)
        if existing is not None:
            old = existing.connection
            if old is not None:
                # Same (mesh, member, session id): another process took over.
                # What the old connection held goes back to the queue.
                existing.connection = None
                self._delivery.detach(existing)
                old.close(protocol.CLOSE_NORMAL, protocol.REASON_SESSION_REPLACED)
                if self._metrics is not None:
                    self._metrics.connections_active.dec()
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
            self._delivery.attach(existing)
            self._writes.update_session(existing.presence_id, {
                "display_name": display_name, "last_active_at": now,
                "groups": tuple(sorted(existing.groups))})
            self._notify("sess", mesh.id, p=existing.presence_id)
            self._hooks.apply_pending(existing)
            return existing, True

        # The same session on another node (issue 15): this hello replaces
        # it there, and nobody hears it leave or come.
        elsewhere = next((r for r in mesh.remote_of(member.id)
                          if r.session_id == hello.sessionId), None)
        session = Session(mesh, member, hello, new_id(), now, display_name, self._node_id)
        session.connection = connection
        mesh.add_session(session)
        if elsewhere is not None:
            del mesh.remote[elsewhere.presence_id]
            session.status, session.summary = elsewhere.status, elsewhere.summary
            if not hello.groups:
                session.groups = dict(elsewhere.groups)
            self._delivery.attach(session)
            self._hooks.apply_pending(session)
            self._writes.open_session(session.record())
            # Its row closes here, its leases going back, whether its node
            # is alive to close the connection (1000 session_replaced) or
            # died (kill -9) before anyone noticed.
            self._writes.close_session(elsewhere.presence_id, now)
            self._notify("repl", mesh.id, p=elsewhere.presence_id, by=session.presence_id)
            self._notify("sess", mesh.id, p=session.presence_id)
            return session, True
        if session.session_pubkey:
            mesh.session_keys[session.session_pubkey] = member.id
        self._delivery.attach(session)
        self._hooks.apply_pending(session)
        self._writes.open_session(session.record())
        if not session.listed:
            self._notify("sess", mesh.id, p=session.presence_id)
        if session.listed:
            departed = mesh.departed.pop((member.id, session.session_id), None)
            event = "peer_returned" if departed is not None else "peer_joined"
            data = peer_event_data(session)
            extra = {}
            if departed is not None:
                extra = {"lastSeenAt": iso_millis(departed[0]), "summary": departed[1]}
                data.update(extra)
            broadcast_system(session, event, data, now)
            self._notify("sess", mesh.id, p=session.presence_id, e=event, x=extra)
            self._writes.audit(AuditEvent(mesh.id, "peer_joined", member.id, {
                "pubkey": session.pubkey, "groups": sorted(session.groups),
                "restored": departed is not None}, now))
        return session, False

    def ready(self, session):
        """
        The hello_ack is on its way: hand the session what waits for it.
        """
        self._delivery.ready(session)

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
        if self._metrics is not None:
            self._metrics.connections_active.dec()
        ending = session.ending
        if (ending is not None and ending != "grace") or (clean and ending is None):
            self._end_session(session)
            return
        # Grace: leases go back at once so a sibling session can take member
        # deliveries; presence stays until the window ends.
        session.grace_call = self._clock.callLater(
            self._settings.grace_seconds, self._grace_over, session)
        self._delivery.detach(session)

    def _grace_over(self, session):
        session.grace_call = None
        if session.connection is None:
            self._end_session(session)

    def _remove(self, session):
        """
        Take C{session} out of its mesh and stop its grace timer; C{False}
        when it had already left (ended twice, or replaced meanwhile).
        """
        if not session.mesh.remove_session(session):
            return False
        if session.grace_call is not None and session.grace_call.active():
            session.grace_call.cancel()
        session.grace_call = None
        return True

    def _end_session(self, session):
        mesh = session.mesh
        if not self._remove(session):
            return
        now = self._now()
        self._writes.close_session(session.presence_id, now)
        self._notify("sess", mesh.id, p=session.presence_id, c=True,
                     e="peer_left" if session.listed else None)
        if session.listed:
            mesh.departed[(session.member.id, session.session_id)] = (now, session.summary)
            if len(mesh.departed) > DEPARTED_KEPT:
                mesh.departed.pop(next(iter(mesh.departed)))
            broadcast_system(session, "peer_left", peer_event_data(session), now)
            self._writes.audit(AuditEvent(mesh.id, "peer_left", session.member.id, {}, now))
        self._delivery.detach(session)

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

    def replaced_elsewhere(self, session):
        """
        A hello on another node took this session over (issue 15): its
        connection closes with 1000 C{session_replaced}, and it leaves this
        node without a word (the other node closed its row).
        """
        if not self._remove(session):
            return
        connection, session.connection = session.connection, None
        session.ending = "replaced"
        self._delivery.detach(session)
        if connection is not None:
            connection.close(protocol.CLOSE_NORMAL, protocol.REASON_SESSION_REPLACED)
            if self._metrics is not None:
                self._metrics.connections_active.dec()

    # -- peers ---------------------------------------------------------------------

    def list_peers(self, session, frame):
        listed = [s for s in session.mesh.everyone() if s.listed or s is session]
        return pages.page(protocol.PeersList(peers=[]).to_wire(), "peers", listed,
                          self._settings.max_message_bytes, peer_row,
                          lambda s: (s.connected_at, s.order), (int, int), frame.cursor)

    # -- shutdown -------------------------------------------------------------------

    def shut_down(self):
        """
        Graceful shutdown: every live session is closed with 1001 C{shutting
        down} (its client reconnects with backoff) and every session marked
        closed in the store. No C{peer_left} goes out: everyone is leaving.

        @return: a L{Deferred} that fires after the close frames had a moment
            on the wire, once the writes are flushed.
        """
        now = self._now()
        closing = 0
        for mesh in self._meshes.meshes():
            for session in list(mesh.sessions.values()):
                if session.grace_call is not None and session.grace_call.active():
                    session.grace_call.cancel()
                session.grace_call = None
                connection, session.connection = session.connection, None
                session.ending = "shutdown"
                if session.outbox is not None:
                    session.outbox.close()
                if connection is not None:
                    connection.close(protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTTING_DOWN)
                    closing += 1
                self._writes.close_session(session.presence_id, now)
                # The other nodes drop it silently: its client comes back
                # through one of them in a moment.
                self._notify("sess", mesh.id, p=session.presence_id, c=True)
            mesh.clear_sessions()
        if self._metrics is not None:
            self._metrics.connections_active.set(0)
        d = self._writes.flushed()
        if closing:
            # Give the close frames a moment on the wire before the reactor
            # stops; clients see 1001 rather than a dropped connection.
            d.addCallback(lambda _: task.deferLater(self._clock, SHUTDOWN_CLOSE_WAIT,
                                                    lambda: None))
        return d
