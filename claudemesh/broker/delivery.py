"""
Delivery: routing a C{send} to its recipients, leasing deliveries to live
sessions, pushing them, and their confirmation (C{client_ack}).

A C{send} becomes one message and one delivery per recipient, committed
before the sender's C{ack}. When a live session may take a delivery right
away (its outbox is idle and its status lets the priority through), the
delivery is stored already leased to it and pushed after the commit;
otherwise it is stored queued and the recipient's outbox is woken, so its
next claim (queued behind the message in the one serial write queue) finds
it. A lease lasts C{lease_seconds}; a connection that goes away gives its
leases back at once; a lease that ends without a C{client_ack} is offered
again (the lease sweep). The per-session part — when to claim, when to push
— is the outbox state machine of L{claudemesh.broker.outbox}.
"""

from twisted.internet import defer
from twisted.logger import Logger

from claudemesh import protocol
from claudemesh.audit import iso_millis
from claudemesh.broker import pages
from claudemesh.broker.ids import new_message_id
from claudemesh.broker.outbox import OutboxCore, new_outbox
from claudemesh.broker.ratelimit import TokenBuckets
from claudemesh.broker.sessions import expand_groups, group_matches
from claudemesh.broker.status import DELIVERABLE, may_receive
from claudemesh.store.records import (
    AuditEvent,
    ClaimedDelivery,
    ClaimRequest,
    NewDelivery,
    NewMessage,
)

CLAIM_BATCH = 200


def push_payload(row):
    """
    The encoded C{push} of one L{ClaimedDelivery}: the one way a push frame
    is built, for fresh and claimed deliveries alike.
    """
    return protocol.encode(protocol.Push(
        messageId=row.message_id, meshId=row.mesh_id, senderPubkey=row.sender_pubkey,
        senderMemberPubkey=row.sender_member_pubkey, targetSpec=row.target_spec,
        priority=row.priority, nonce=row.nonce, ciphertext=row.ciphertext,
        createdAt=iso_millis(row.created_at), seq=row.seq,
        # Issue 17: broadcasts and group messages say their key epoch.
        keyEpoch=row.key_epoch if protocol.is_broadcast(row.target_spec) else None).to_wire())


class Delivery:
    """
    The delivery part of the broker core.

    @param meshes: the L{claudemesh.broker.sessions.MeshDirectory}.
    @param writes: the L{claudemesh.broker.groupcommit.GroupCommit}: every
        write and every claim goes through it, in order.
    @param store: for the reads that need no ordering (C{message_status}).
    @param key_epochs: C{key_epochs(session, frame, broadcast)}, why a send
        must be refused for its key epoch (C{(error, current epoch)}) or
        C{None} (issue 17, L{claudemesh.broker.meshkeys.MeshKeys.refuse_send}).
    """

    _log = Logger()

    def __init__(self, meshes, writes, store, clock, settings, metrics=None,
                 key_epochs=lambda session, frame, broadcast: None,
                 notify=lambda kind, mesh_id, **data: None):
        """
        @param notify: C{notify(kind, mesh_id, **data)} queues a notice for
            the other nodes of the cluster (L{claudemesh.broker.cluster}):
            here, C{wake} for members whose sessions elsewhere may claim.
        """
        self._key_epochs = key_epochs
        self._notify = notify
        self._meshes = meshes
        self._writes = writes
        self._store = store
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._send_buckets = TokenBuckets(
            clock, settings.send_rate_limit_burst, settings.send_rate_limit_per_min)

    def _now(self):
        return int(self._clock.seconds() * 1000)

    def _lease_ms(self):
        return self._settings.lease_seconds * 1000

    # -- sessions coming and going -------------------------------------------

    def attach(self, session):
        """
        C{session} has a new connection: give it an outbox of its own.
        """
        connection = session.connection
        session.outbox = new_outbox(OutboxCore(
            claim=lambda: self._claim(session),
            push=lambda row: self._push_claimed(session, connection, row),
            is_paused=lambda: bool(getattr(connection, "paused", False)),
            hand_back=lambda rows: self.release(session),
            batch_limit=CLAIM_BATCH))

    def ready(self, session):
        """
        The hello_ack is on its way: hand the session (and, for a member
        session, its siblings, most recently active first) what waits.
        """
        if session.watch:
            self.wake(session)
        elif session.receive:
            self.wake_member(session.mesh, session.member.id)

    def detach(self, session):
        """
        The connection of C{session} is gone (closed, dropped, replaced):
        its leases go back at once, and its member's other sessions are
        offered what it held.
        """
        if session.outbox is not None:
            session.outbox.close()
        session.inflight.clear()
        self.release(session)

    def release(self, session):
        """
        Give back the leases of C{session} and offer its member's deliveries
        to the member's live sessions. The claims this wakes are queued
        behind the release, so they see it.
        """
        self._writes.release_leases(session.presence_id)
        self.offer(session.mesh, session.member.id)

    def offer(self, mesh, member_id):
        """
        Offer the member's queued deliveries to its sessions on this node
        and, through a notice, on the others.
        """
        self.wake_member(mesh, member_id)
        self.wake_elsewhere(mesh, [member_id])

    def wake_elsewhere(self, mesh, member_ids):
        """
        Tell the other nodes holding sessions of these members that
        deliveries may wait for them (sent with the batch that stores them).
        """
        elsewhere = sorted({m for m in member_ids if mesh.remote_of(m)}) if mesh.remote else ()
        if elsewhere:
            self._notify("wake", mesh.id, u=elsewhere)

    def wake(self, session):
        """
        Something may be claimable for C{session} now.
        """
        if not session.live or session.outbox is None:
            return
        if session.watch and not session.session_pubkey:
            return
        if session.announced or session.watch:
            session.outbox.wake()

    def wake_member(self, mesh, member_id):
        """
        Offer the member's queued deliveries to its live sessions, most
        recently active first (the first one that may take a delivery
        claims it).
        """
        sessions = [s for s in mesh.sessions_of(member_id) if s.live]
        sessions.sort(key=lambda s: s.last_active_at, reverse=True)
        for s in sessions:
            self.wake(s)

    def writable(self, session):
        """
        The connection of C{session} drained its outbound buffer.
        """
        if session.outbox is not None:
            session.outbox.writable()

    # -- the outbox's actions -------------------------------------------------

    def _claim(self, session):
        return self._writes.claim(ClaimRequest(
            member_id=session.member.id, session_pubkey=session.session_pubkey,
            presence_id=session.presence_id, groups=tuple(expand_groups(session.groups)),
            priorities=tuple(DELIVERABLE[session.status.status]), now=self._now(),
            lease_ms=self._lease_ms(), limit=CLAIM_BATCH,
            # A watching session takes its own session deliveries only.
            member_deliveries=not session.watch))

    def _push_claimed(self, session, connection, row):
        if session.connection is not connection:
            return False
        if row.attempts > 1 and self._metrics is not None:
            self._metrics.redeliveries.inc()
        session.inflight[row.message_id] = (row.recipient_key, self._now() + self._lease_ms())
        self._push(connection, push_payload(row), row.message_id)
        return True

    def _push(self, connection, payload, message_id):
        """
        Send one encoded push.

        A push that cannot be sent (the WebSocket layer refuses a frame
        larger than its limit, say after the operator lowered
        C{--max-message-bytes} while it was queued) must not stop the pushes
        behind it: it is skipped, its delivery stays leased, and it is
        offered again when the lease ends — nothing is lost, and the outbox
        keeps moving.
        """
        try:
            connection.send_encoded(payload)
        except Exception as e:
            self._log.warn("could not push message {message_id} ({size} bytes): {error}",
                           message_id=message_id, size=len(payload), error=str(e)[:200])
            if self._metrics is not None:
                self._metrics.push_failures.inc()
            return
        if self._metrics is not None:
            self._metrics.pushes.inc()

    # -- sending ----------------------------------------------------------------

    def send(self, session, frame):
        """
        Store a message and its deliveries, then acknowledge it.

        @return: a L{Deferred} firing with the C{ack} frame.
        """
        client_id = frame.id or ""

        def refused(reason, error, current_epoch=None):
            if self._metrics is not None:
                self._metrics.messages_rejected.labels(reason).inc()
            return defer.succeed(protocol.Ack(
                id=client_id, messageId="", queued=False, error=error,
                currentEpoch=current_epoch).to_wire())

        settings = self._settings
        if not self._send_buckets.take(session.member.id):
            return refused("rate_limit", "rate_limit: max %d msg/min (burst %d) — slow down" % (
                settings.send_rate_limit_per_min, settings.send_rate_limit_burst))
        size = len(frame.ciphertext) + len(frame.nonce) + len(frame.targetSpec)
        if settings.max_message_bytes and size > settings.max_message_bytes:
            return refused("too_large", "payload too large: %d bytes > MAX_MESSAGE_BYTES=%d" % (
                size, settings.max_message_bytes))
        # Issue 17: broadcasts and group messages sealed under an old key.
        broadcast = protocol.is_broadcast(frame.targetSpec)
        stale = self._key_epochs(session, frame, broadcast)
        if stale is not None:
            return refused(stale[0].partition(":")[0], stale[0], stale[1])
        routed, busy = self._route(session, frame.targetSpec, frame.priority)
        if routed is None:
            return refused("unknown_target", "unknown_target")
        now = self._now()
        message = NewMessage(
            id=new_message_id(now),
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
            deliveries=tuple(delivery for delivery, _ in routed),
            client_id=frame.id,
            key_epoch=frame.keyEpoch if broadcast else 0,
        )
        audit = AuditEvent(session.mesh.id, "message_sent", session.member.id, {
            "targetSpec": frame.targetSpec, "priority": frame.priority,
            "bytes": len(frame.ciphertext)}, now)
        d = self._writes.enqueue(message, audit)
        # Recipients on other nodes claim it there, woken by a notice sent
        # with the batch that stores it: every recipient no session here
        # took it for, since this node may not have heard yet of a session
        # that said hello elsewhere a moment ago.
        self._notify("wake", session.mesh.id, u=sorted(
            {delivery.member_id for delivery, taker in routed if taker is None}))
        # Recipients whose outbox was busy: their next claim, queued behind
        # this message, finds it.
        for recipient in busy:
            self.wake(recipient)

        def committed(result):
            if result.duplicate:
                return protocol.Ack(id=client_id, messageId=result.message_id,
                                    queued=True).to_wire()
            if self._metrics is not None:
                self._metrics.messages_routed.labels(frame.priority).inc()
            self._push_fresh(message, result.seq, routed)
            # How many recipients, and how many a live session takes at once
            # (leased now, or claimed by a busy outbox right after); the
            # rest wait: offline, or working/dnd for this priority.
            pushed = sum(1 for _, taker in routed if taker is not None) + sum(
                1 for s in busy if may_receive(s.status.status, frame.priority))
            return protocol.Ack(id=client_id, messageId=result.message_id, queued=True,
                                recipients=len(routed), pushed=pushed).to_wire()

        def failed(f):
            self._log.failure("storing a message failed", f)
            if self._metrics is not None:
                self._metrics.messages_rejected.labels("store_unavailable").inc()
            return protocol.Ack(
                id=client_id, messageId="", queued=False,
                error="store_unavailable: the broker cannot store messages right now").to_wire()

        return d.addCallbacks(committed, failed)

    def _route(self, sender, target, priority):
        """
        The deliveries of a message to C{target}, each paired with the live
        session it is leased to at once (or C{None}: it is stored queued),
        and the recipient sessions whose outbox was too busy to take it
        now; C{(None, ())} for an unknown direct target.
        """
        mesh = sender.mesh
        lease_until = self._now() + self._lease_ms()
        result = []
        busy = []

        def deliver(member_id, session_pubkey=None, group=None):
            taker = self._taker(mesh, sender, member_id, session_pubkey, group, priority, busy)
            result.append((NewDelivery(
                member_id=member_id, session_pubkey=session_pubkey, group_name=group,
                lease_session=taker.presence_id if taker is not None else None,
                lease_until=lease_until if taker is not None else None), taker))

        if target in ("*", "@all") or target.startswith("@"):
            group = None if target in ("*", "@all") else target[1:]
            if group is not None and not protocol.is_valid_group(group):
                return None, ()
            members = set()
            for s in mesh.everyone():
                if s.announced and s.member.id != sender.member.id:
                    if group is None or any(group_matches(g, group) for g in s.groups):
                        members.add(s.member.id)
            for member_id in sorted(members):
                deliver(member_id, group=group)
            return result, busy
        member = mesh.members_by_pubkey.get(target)
        if member is not None and member.revoked_at is None:
            deliver(member.id)
            return result, busy
        owner_id = mesh.session_keys.get(target)
        if owner_id is not None:
            owner = mesh.members.get(owner_id)
            if owner is not None and owner.revoked_at is None:
                deliver(owner_id, session_pubkey=target)
                return result, busy
        return None, ()

    def _taker(self, mesh, sender, member_id, session_pubkey, group, priority, busy):
        """
        The live session that takes a new delivery right away, or C{None} to
        store it queued: the most recently active session of the recipient
        that may receive this priority — unless one of the recipient's
        sessions has its outbox busy (a claim or a push under way could be
        overtaken), which is then added to C{busy}.
        """
        best = None
        if mesh.remote:
            # A session on another node may be claiming this member's
            # deliveries right now: a fresh lease here could overtake what
            # it is about to take, so the delivery waits in the queue and
            # every session of the member is woken to claim.
            elsewhere = [r for r in mesh.remote_of(member_id)
                         if session_pubkey is None or r.session_pubkey == session_pubkey]
            if elsewhere:
                busy.extend(s for s in mesh.sessions_of(member_id) if s.live and s is not sender
                            and s.outbox is not None)
                return None
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
            if not s.outbox.take_fresh():
                busy.append(s)
                return None
            if not may_receive(s.status.status, priority):
                continue
            if best is None or s.last_active_at > best.last_active_at:
                best = s
        return best

    def _push_fresh(self, message, seq, routed):
        payload = None
        for delivery, taker in routed:
            if taker is None:
                continue
            if taker.connection is None:
                # It went away between routing and commit: give back the
                # lease this batch stored, and hand the delivery on.
                self.release(taker)
                continue
            if payload is None:
                payload = push_payload(ClaimedDelivery.fresh(message, delivery, seq))
            # Held as in flight even when the push fails: the lease sweep
            # then offers it again when the lease ends.
            taker.inflight[message.id] = (delivery.recipient_key, delivery.lease_until)
            self._push(taker.connection, payload, message.id)

    # -- confirmations and leases --------------------------------------------

    def client_ack(self, session, frame):
        member_id = session.member.id
        held = session.inflight.pop(frame.messageId, None)
        if held is not None:
            self._writes.ack(frame.messageId, member_id, held[0])
            return
        # Not (or no longer) leased here: still confirm what this session
        # may confirm — its member's delivery or its own session delivery.
        # The store ignores unknown ones and those of other members, so this
        # stays a no-op for unknown, repeated or foreign ids. A watching
        # session confirms nothing of its member's.
        if not session.watch:
            self._writes.ack(frame.messageId, member_id, member_id)
        if session.session_pubkey:
            self._writes.ack(frame.messageId, member_id, session.session_pubkey)

    def sweep_leases(self):
        """
        Leases that ended without a C{client_ack}: offer those deliveries
        again.
        """
        now = self._now()
        for session in self._meshes.sessions():
            expired = [mid for mid, (_, until) in session.inflight.items() if until <= now]
            if not expired:
                continue
            for mid in expired:
                del session.inflight[mid]
            if self._metrics is not None:
                self._metrics.redeliveries.inc(len(expired))
            self.offer(session.mesh, session.member.id)
        self._send_buckets.sweep()

    @defer.inlineCallbacks
    def message_status(self, session, frame):
        message = yield self._store.get_message(frame.messageId)
        if message is None or message.mesh_id != session.mesh.id:
            raise protocol.Refusal("not_found", "message not found")
        rows = yield self._store.message_deliveries(frame.messageId)
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

        return pages.page(
            protocol.MessageStatusResult(
                messageId=message.id, targetSpec=message.target_spec, recipients=[]).to_wire(),
            "recipients", rows, self._settings.max_message_bytes, recipient,
            lambda row: (row.recipient_key,), (str,), frame.cursor)
