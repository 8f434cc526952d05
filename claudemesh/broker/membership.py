"""
Membership and moderation: meshes, invites, joins, roles, and the three
tiers of removal (docs/membership.md, docs/protocol.md close codes).

Like the rest of the core this knows no sockets and no SQL: it works on the
L{Broker}'s in-memory meshes and sessions and writes through its store. Each
action that changes stored state is one store transaction that also holds
its audit entry (L{IStore.ban_member}, L{IStore.join_member}, …), and it
happens before the in-memory state changes, so a failed write leaves both as
they were.

Removal tiers:
  - C{disconnect}: close 1000 C{disconnected}; the session enters grace and
    its client reconnects; nothing stored changes.
  - C{kick}: close 4001 C{kicked}; the session ends (C{peer_left} at once); the
    client must not reconnect; nothing stored changes.
  - C{ban}: C{revoked_at} set, the invite the member joined with revoked;
    each session gets C{error revoked} then close 4002 C{banned}.
"""

import hmac
import re

import attr
from twisted.internet import defer
from twisted.logger import Logger

from claudemesh import crypto, protocol
from claudemesh.audit import iso_millis
from claudemesh.broker import pages
from claudemesh.broker.ids import new_id
from claudemesh.invite import BadInvite, decode_token, verify_invite
from claudemesh.protocol import Refusal, key_matches
from claudemesh.store.interface import DuplicateKey
from claudemesh.store.records import AuditEvent, InviteRecord, MemberRecord, MeshRecord

PAST = {"disconnect": "disconnected", "kick": "kicked", "ban": "banned", "unban": "unbanned"}
MODERATORS = ("owner", "admin")


def slugify(name):
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "mesh"


class Membership:
    """
    The membership part of the broker core.

    @param presence: ends the sessions a moderation action removes.
    """

    _log = Logger()

    def __init__(self, meshes, store, writes, presence, clock, settings, replays,
                 notify=lambda kind, mesh_id, **data: None):
        """
        @param replays: the L{IReplayMemory} a mesh creation and a join
            are each used once through.
        @param notify: queues a notice for the other nodes (issue 15):
            C{mesh} when members changed (they re-read them, and end their
            own sessions of a banned or departed member), C{end} for the
            sessions of theirs a disconnect or kick ends.
        """
        self._replays = replays
        self._notify = notify
        self._meshes = meshes
        self._store = store
        self._writes = writes
        self._presence = presence
        self._clock = clock
        self._settings = settings

    def _now(self):
        return int(self._clock.seconds() * 1000)

    def _budget(self):
        # Replies listing rows fit in one frame (claudemesh.broker.pages).
        return self._settings.max_message_bytes

    def _event(self, mesh_id, event_type, actor, payload):
        return AuditEvent(mesh_id, event_type, actor, payload, self._now())

    def _audit(self, mesh_id, event_type, actor, payload):
        """
        Record an action that changed nothing stored (a disconnect or kick)
        with the next group commit.
        """
        self._writes.audit(self._event(mesh_id, event_type, actor, payload))

    # -- authorisation -----------------------------------------------------------

    def _require_moderator(self, session, what):
        if session.member.role not in MODERATORS:
            raise Refusal("forbidden", "only owner or admin can %s" % (what,))

    def _check_target(self, session, target, verb):
        """
        The rules every moderation verb shares: the owner is never a target,
        admins act on members only, nobody acts on themselves.
        """
        if target.id == session.member.id:
            raise Refusal("invalid", "cannot %s yourself" % (verb,))
        if target.role == "owner":
            raise Refusal(
                "forbidden", "the mesh owner cannot be %s" % (PAST.get(verb, verb),))
        if target.role == "admin" and session.member.role != "owner":
            raise Refusal("forbidden", "only the owner can %s an admin" % (verb,))

    # -- target resolution ---------------------------------------------------------

    def resolve(self, mesh, target, revoked=False):
        """
        The member a moderation target names, and the one session it names
        when it is a session key (else C{None}: all the member's sessions).

        Matches a display name (the member's or a session's), a member key or
        a session key, in full or by a hex prefix of at least 8 characters.
        Ambiguity counts across members only.

        @raise Refusal: C{not_found} or C{ambiguous} (with C{candidates}).
        """
        found = {}
        session_hit = {}
        for member in mesh.members.values():
            if (member.revoked_at is not None) != revoked:
                continue
            if member.display_name == target or key_matches(member.pubkey, target):
                found[member.id] = member
        if not revoked:
            for s in mesh.everyone():
                member = mesh.members.get(s.member.id)
                if member is None or member.revoked_at is not None:
                    continue
                if s.display_name == target:
                    found[member.id] = member
                elif key_matches(s.session_pubkey, target):
                    found[member.id] = member
                    session_hit.setdefault(member.id, []).append(s)
        if not found:
            if revoked:
                raise Refusal("not_found", 'no banned peer "%s"' % (target,))
            raise Refusal("not_found", 'peer "%s" not found' % (target,))
        if len(found) > 1:
            candidates = [{"name": m.display_name, "pubkey": m.pubkey}
                          for m in sorted(found.values(), key=lambda m: m.display_name)]
            raise Refusal("ambiguous", '"%s" matches %d members' % (target, len(found)),
                          candidates=candidates)
        [member] = found.values()
        hits = session_hit.get(member.id)
        # A session key picks that session, unless the target also named the
        # member itself.
        only = None
        if hits and not (member.display_name == target or key_matches(member.pubkey, target)):
            only = hits
        return member, only

    # -- meshes --------------------------------------------------------------------

    @defer.inlineCallbacks
    def create_mesh(self, body):
        """
        C{POST /meshes}: a new mesh and its owner, signed by the owner key.

        @return: C{{meshId, memberId, slug, name}}.
        @raise Refusal: C{malformed}, C{timestamp_skew}, C{bad_signature}.
        """
        if not isinstance(body, dict):
            raise Refusal("malformed", "body must be a JSON object")
        name, owner_pubkey = body.get("name"), body.get("ownerPubkey")
        display_name, timestamp = body.get("displayName"), body.get("timestamp")
        signature = body.get("signature")
        if not protocol.is_valid_name(name):
            raise Refusal("malformed", "field 'name' must be 1-64 characters without '|'")
        if not protocol.is_valid_name(display_name):
            raise Refusal("malformed", "field 'displayName' must be 1-64 characters without '|'")
        if not crypto.is_pubkey(owner_pubkey):
            raise Refusal("malformed", "field 'ownerPubkey' must be 64 lowercase hex characters")
        if not crypto.is_signature(signature):
            raise Refusal("malformed", "field 'signature' must be 128 lowercase hex characters")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int):
            raise Refusal("malformed", "field 'timestamp' must be an integer (ms)")
        now = self._now()
        if abs(now - timestamp) > protocol.SIGNED_SKEW_MS:
            raise Refusal("timestamp_skew", "timestamp is more than 60 s from the broker's clock")
        if not crypto.verify(owner_pubkey, crypto.create_mesh_string(name, owner_pubkey, timestamp),
                             signature):
            raise Refusal("bad_signature", "signature does not verify with ownerPubkey")
        fresh = yield self._replays.first_use("create", owner_pubkey, signature,
                                                     timestamp + protocol.SIGNED_SKEW_MS)
        if not fresh:
            raise Refusal("replayed", "this signed request was already used")
        mesh = MeshRecord(new_id(), name, slugify(name), owner_pubkey, now)
        owner = MemberRecord(new_id(), mesh.id, owner_pubkey, display_name, "owner", now)
        yield self._store.create_mesh(mesh, owner, [self._event(
            mesh.id, "mesh_created", owner.id, {"name": name, "ownerPubkey": owner_pubkey})])
        self._log.info("mesh {mesh_id} created", mesh_id=mesh.id)
        return {"meshId": mesh.id, "memberId": owner.id, "slug": mesh.slug, "name": mesh.name}

    # -- invites ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def create_invite(self, session, frame):
        self._require_moderator(session, "create invites")
        if session.member.role == "admin" and frame.role != "member":
            raise Refusal("forbidden", "admins can only invite members")
        now = self._now()
        expires_at = now // 1000 + frame.expiresIn
        invite = InviteRecord(new_id(), session.mesh.id, frame.role, frame.maxUses,
                              expires_at * 1000, session.member.id, now)
        yield self._store.create_invite(invite, [self._event(
            session.mesh.id, "invite_created", session.member.id, {
                "inviteId": invite.id, "role": invite.role, "maxUses": invite.max_uses,
                "expiresAt": expires_at})])
        return protocol.InviteCreated(
            inviteId=invite.id, expiresAt=expires_at, role=invite.role,
            maxUses=invite.max_uses, meshId=session.mesh.id,
            meshName=session.mesh.name).to_wire()

    @defer.inlineCallbacks
    def list_invites(self, session, frame):
        self._require_moderator(session, "list invites")
        invites = yield self._store.list_invites(session.mesh.id)
        return pages.page(
            protocol.InvitesList(invites=[]).to_wire(), "invites", invites, self._budget(),
            lambda i: {
                "inviteId": i.id, "role": i.role, "maxUses": i.max_uses,
                "usedCount": i.used_count, "expiresAt": i.expires_at // 1000,
                "revoked": i.revoked_at is not None,
            }, lambda i: (i.created_at, i.id), (int, str), frame.cursor)

    @defer.inlineCallbacks
    def revoke_invite(self, session, frame):
        self._require_moderator(session, "revoke invites")
        invite = yield self._store.get_invite(frame.inviteId)
        if invite is None or invite.mesh_id != session.mesh.id:
            raise Refusal("not_found", "invite not found")
        if session.member.role == "admin" and invite.role != "member":
            raise Refusal("forbidden", "only the owner can revoke an admin invite")
        yield self._store.revoke_invite(invite.id, self._now(), [self._event(
            session.mesh.id, "invite_revoked", session.member.id, {"inviteId": invite.id})])
        return protocol.RevokeInviteAck(inviteId=invite.id).to_wire()

    # -- joining ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def join(self, frame):
        """
        A new key joins with an invite (the C{join} frame or C{POST /join}).

        @return: C{{meshId, memberId, role, slug, meshName}}.
        @raise Refusal: one of C{malformed}, C{bad_proof},
            C{invite_bad_signature}, C{invite_not_found},
            C{invite_mesh_mismatch}, C{invite_revoked}, C{invite_expired},
            C{invite_exhausted}, C{revoked}.
        """
        if not crypto.is_pubkey(frame.pubkey):
            raise Refusal("malformed", "field 'pubkey' must be 64 lowercase hex characters")
        try:
            token = decode_token(frame.invite)
        except BadInvite as e:
            raise Refusal("malformed", "field 'invite': %s" % (e,)) from None
        now = self._now()
        proof = crypto.join_string(token["inviteId"], frame.pubkey, frame.displayName,
                                   frame.timestamp)
        if not (crypto.is_signature(frame.signature)
                and crypto.verify(frame.pubkey, proof, frame.signature)):
            raise Refusal("bad_proof", "the join signature does not verify with pubkey")
        if abs(now - frame.timestamp) > protocol.SIGNED_SKEW_MS:
            raise Refusal("bad_proof", "the join timestamp is more than 60 s from the "
                          "broker's clock")
        invite = yield self._store.get_invite(token["inviteId"])
        if invite is None:
            raise Refusal("invite_not_found", "no such invite")
        if invite.mesh_id != token["meshId"]:
            raise Refusal("invite_mesh_mismatch", "the invite belongs to another mesh")
        mesh = yield self._meshes.load(invite.mesh_id)
        inviter = mesh.members.get(invite.created_by) if mesh is not None else None
        if inviter is None and mesh is not None and self._meshes.node_id is not None:
            # The inviter joined through another node a moment ago.
            yield self._meshes.reload_members(mesh)
            inviter = mesh.members.get(invite.created_by)
        # The token must say what the broker's own row says, and be signed by
        # the member who asked for it.
        if (inviter is None or token["role"] != invite.role
                or token["expiresAt"] * 1000 != invite.expires_at
                or token["inviterPubkey"] != inviter.pubkey or not verify_invite(token)):
            raise Refusal("invite_bad_signature", "the invite is not one this broker signed off")
        if invite.revoked_at is not None or inviter.revoked_at is not None or (
                inviter.role not in MODERATORS):
            raise Refusal("invite_revoked", "the invite was revoked")
        if invite.expires_at <= now:
            raise Refusal("invite_expired", "the invite expired")
        existing = mesh.members_by_pubkey.get(frame.pubkey)
        if existing is not None:
            if existing.revoked_at is not None:
                raise Refusal("revoked", protocol.revoked_message(mesh.name),
                              close=(protocol.CLOSE_BANNED, protocol.REASON_BANNED))
            # Re-joining with the same key is the existing membership, and
            # takes no use of the invite.
            return self._join_result(mesh, existing)
        # A new membership is made once per signed join: the same proof sent
        # again (after a leave, say) is refused, not a second join. A retry
        # of a join that worked found the membership just above.
        fresh = yield self._replays.first_use("join", frame.pubkey, frame.signature,
                                                     frame.timestamp + protocol.SIGNED_SKEW_MS)
        if not fresh:
            raise Refusal("replayed", "this signed join was already used")
        member = MemberRecord(new_id(), mesh.id, frame.pubkey, frame.displayName, invite.role,
                              now, invite_id=invite.id)
        joined = self._event(mesh.id, "member_joined", member.id, {
            "pubkey": member.pubkey, "role": member.role, "inviteId": invite.id})
        try:
            outcome = yield self._store.join_member(member, now, [joined])
        except DuplicateKey:
            # The same key joined concurrently through another request; this
            # transaction, and the use of the invite it took, rolled back.
            found = yield self._store.find_member(mesh.id, frame.pubkey)
        else:
            if outcome.member is None:
                raise Refusal("invite_exhausted", "the invite has no uses left")
            found = outcome.member
        mesh.put_member(found)
        self._notify("mesh", mesh.id)
        if found.revoked_at is not None:
            raise Refusal("revoked", protocol.revoked_message(mesh.name),
                          close=(protocol.CLOSE_BANNED, protocol.REASON_BANNED))
        return self._join_result(mesh, found)

    def _join_result(self, mesh, member):
        return {"meshId": mesh.id, "memberId": member.id, "role": member.role,
                "slug": mesh.record.slug, "meshName": mesh.name}

    # -- roles and leaving -------------------------------------------------------------

    @defer.inlineCallbacks
    def set_role(self, session, frame):
        if session.member.role != "owner":
            raise Refusal("forbidden", "only the owner can change roles")
        mesh = session.mesh
        target, _ = self.resolve(mesh, frame.target)
        if target.id == session.member.id:
            raise Refusal("invalid", "you are the owner: hand ownership over with role owner "
                          "to another member")
        changed = self._event(mesh.id, "role_changed", session.member.id, {
            "target": target.display_name, "targetPubkey": target.pubkey, "role": frame.role})
        if frame.role == "owner":
            # Both roles change in one transaction: never two owners.
            yield self._store.hand_over_ownership(session.member.id, target.id, self._now(),
                                                  [changed])
            mesh.put_member(attr.evolve(session.member, role="admin"))
        else:
            # Invites the target could make and no longer can are revoked
            # with the change (IStore.set_member_role).
            yield self._store.set_member_role(target.id, frame.role, self._now(), [changed])
        mesh.put_member(attr.evolve(target, role=frame.role))
        self._notify("mesh", mesh.id)
        return protocol.SetRoleAck(target=target.display_name, role=frame.role).to_wire()

    @defer.inlineCallbacks
    def leave(self, session, frame):
        member = session.member
        if member.role == "owner":
            raise Refusal("invalid", "the owner must hand ownership over first "
                                   "(set_role <member> owner)")
        mesh = session.mesh
        yield self._store.remove_member(member.id, [self._event(
            mesh.id, "member_left", member.id, {"pubkey": member.pubkey,
                                                "name": member.display_name})])
        mesh.drop_member(member)
        self._notify("mesh", mesh.id)
        self._presence.forget_member_keys(mesh, member.id)
        for s in mesh.sessions_of(member.id):
            if s is not session:
                self._presence.end_connection(s, protocol.CLOSE_NORMAL, "left", "left")
        # The caller's own session ends once the reply is out.
        self._clock.callLater(
            0, self._presence.end_connection, session, protocol.CLOSE_NORMAL, "left", "left")
        return protocol.LeaveAck().to_wire()

    def list_members(self, session, frame):
        mesh = session.mesh
        # A watching session (claudemesh ui) does not make its member online.
        online = {s.member.id for s in mesh.everyone() if s.live and not s.watch}
        members = [m for m in mesh.members.values() if m.revoked_at is None]
        return pages.page(
            protocol.MembersList(members=[]).to_wire(), "members", members, self._budget(),
            lambda m: {
                "name": m.display_name, "memberPubkey": m.pubkey, "role": m.role,
                "online": m.id in online,
            }, lambda m: (m.joined_at, m.id), (int, str), frame.cursor)

    # -- disconnect and kick -------------------------------------------------------------

    def disconnect(self, session, frame):
        return self._remove_sessions(session, frame, "disconnect")

    def kick(self, session, frame):
        return self._remove_sessions(session, frame, "kick")

    def _remove_sessions(self, session, frame, verb):
        self._require_moderator(session, verb)
        mesh = session.mesh
        now = self._now()
        reason = PAST[verb]
        if frame.target is not None:
            member, only = self.resolve(mesh, frame.target)
            self._check_target(session, member, verb)
            chosen = only if only is not None else (
                mesh.sessions_of(member.id) + mesh.remote_of(member.id))
            # One-shot commands (never listed as peers) end by themselves
            # within seconds; they are nobody's presence.
            chosen = [s for s in chosen if s.listed]
        else:
            if frame.stale is not None:
                reason += "_stale"
            chosen = []
            for s in mesh.everyone():
                if s.member.id == session.member.id or s.member.role == "owner":
                    continue
                if s.member.role == "admin" and session.member.role != "owner":
                    continue
                if not s.listed:
                    continue
                if frame.stale is not None and now - s.last_active_at <= frame.stale:
                    continue
                chosen.append(s)
        if verb == "disconnect":
            # Only a live connection can be reset; one in grace already is.
            chosen = [s for s in chosen if s.live]
            code, ending = protocol.CLOSE_NORMAL, "grace"
        else:
            code, ending = protocol.CLOSE_KICKED, "kicked"
        chosen = sorted(chosen, key=lambda s: (s.display_name, s.connected_at))
        names = [s.display_name for s in chosen]
        # Which session each name is, and whether it was connected: a kick
        # also ends sessions in grace, which is not ending a connected one.
        detail = [{"name": s.display_name, "memberPubkey": s.member.pubkey,
                   "sessionId": s.session_id, "online": s.live} for s in chosen]
        elsewhere = [s.presence_id for s in chosen if s.remote]
        if elsewhere:
            # Their nodes end them, with the same code and reason.
            self._notify("end", mesh.id, p=elsewhere, c=code, r=reason, e=ending)
        for s in chosen:
            if not s.remote:
                self._presence.end_connection(s, code, reason, ending)
        if chosen:
            self._audit(mesh.id, "member_%s" % (PAST[verb],), session.member.id, {
                "targets": sorted({s.member.pubkey for s in chosen}), "count": len(chosen),
                "reason": reason})
        reply = protocol.KickAck if verb == "kick" else protocol.DisconnectAck
        return reply(kicked=names, affected=names, sessions=detail).to_wire()

    # -- ban and unban --------------------------------------------------------------------

    @defer.inlineCallbacks
    def ban(self, session, frame):
        self._require_moderator(session, "ban")
        mesh = session.mesh
        member, _ = self.resolve(mesh, frame.target)
        self._check_target(session, member, "ban")
        now = self._now()
        # One transaction: the revocation, the invite that key came with (a
        # ban is per key) and the audit entry.
        yield self._store.ban_member(member.id, now, [self._event(
            mesh.id, "member_banned", session.member.id, {
                "target": member.display_name, "targetPubkey": member.pubkey})])
        mesh.put_member(attr.evolve(member, revoked_at=now))
        # The other nodes re-read the members and end theirs the same way.
        self._notify("mesh", mesh.id)
        self.end_banned(mesh, member)
        return protocol.BanAck(banned=member.display_name).to_wire()

    def end_banned(self, mesh, member):
        """
        End this node's sessions of a banned member: C{error revoked}, then
        close 4001.
        """
        error = protocol.error_frame("revoked", protocol.revoked_message(mesh.name))
        for s in mesh.sessions_of(member.id):
            if s.live:
                s.connection.send(error)
            self._presence.end_connection(
                s, protocol.CLOSE_BANNED, protocol.REASON_BANNED, "banned")

    def end_departed(self, mesh, member):
        """
        End this node's sessions of a member who left (through another
        node).
        """
        self._presence.forget_member_keys(mesh, member.id)
        for s in mesh.sessions_of(member.id):
            self._presence.end_connection(s, protocol.CLOSE_NORMAL, "left", "left")

    @defer.inlineCallbacks
    def unban(self, session, frame):
        self._require_moderator(session, "unban")
        mesh = session.mesh
        member, _ = self.resolve(mesh, frame.target, revoked=True)
        if member.role == "admin" and session.member.role != "owner":
            raise Refusal("forbidden", "only the owner can unban an admin")
        yield self._store.unban_member(member.id, [self._event(
            mesh.id, "member_unbanned", session.member.id, {
                "target": member.display_name, "targetPubkey": member.pubkey})])
        mesh.put_member(attr.evolve(member, revoked_at=None))
        self._notify("mesh", mesh.id)
        return protocol.UnbanAck(unbanned=member.display_name).to_wire()

    def list_bans(self, session, frame):
        self._require_moderator(session, "list bans")
        banned = [m for m in session.mesh.members.values() if m.revoked_at is not None]
        return pages.page(
            protocol.ListBansResult(bans=[]).to_wire(), "bans", banned, self._budget(),
            lambda m: {
                "name": m.display_name, "pubkey": m.pubkey,
                "revokedAt": iso_millis(m.revoked_at),
            }, lambda m: (m.revoked_at, m.id), (int, str), frame.cursor)


def token_matches(expected, authorization):
    """
    Does an C{Authorization} header carry the admin token? Compared in
    constant time.
    """
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization[len("Bearer "):].strip().encode("utf-8"),
                               expected.encode("utf-8"))
