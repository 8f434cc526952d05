"""
Mesh key epochs (issue 17): the broker's half of rotating a mesh's key.

Broadcasts and group messages are sealed with the mesh key, which every
member got in its invite link. A member who leaves or is banned keeps it, so
owners and admins rotate: their client makes a fresh key, seals a copy to
each current member's key and uploads the copies (C{rotate_mesh_key}, in one
or more parts). The broker stores them as opaque blobs per (mesh, epoch,
member), never the key, and commits the new epoch in one store transaction
with its audit entry only when the copies cover exactly the current members;
until then the previous epoch stays current and everything works as before.

After a commit the broker tells every live session (C{mesh_key_rotated}),
each member fetches its own copy (C{get_mesh_key}), and a broadcast or group
message sealed under an older epoch is refused (C{stale_key_epoch}), so no
client keeps sealing with a key a removed member holds. A member without a
copy of the current key (it joined with an invite made before the rotation)
asks for it; owners' and admins' clients holding the key then seal one for it
(C{mesh_key_wanted}, C{share_mesh_key}). The wire contract is in
docs/protocol.md ("Mesh key epochs"); what this protects, in docs/security.md.

Like the rest of the broker's domain this knows no sockets and no SQL: it
gets the store, the group commit and the clock from the broker that owns it,
and pushes its events with L{claudemesh.broker.events.push_system}.
"""

import attr
from twisted.internet import defer
from twisted.logger import Logger

from claudemesh import protocol
from claudemesh.audit import iso_millis
from claudemesh.broker.events import push_system
from claudemesh.protocol import Refusal
from claudemesh.store.interface import DuplicateKey
from claudemesh.store.records import AuditEvent, KeyRotation

MODERATORS = ("owner", "admin")
# How long the parts of one rotation may take, from the first to the last.
STAGING_SECONDS = 300
# How many departed members and members without a copy a hello_ack lists.
REPORT_LIMIT = 20
DEFAULT_REASON = "manual"
# The notices nodes of a cluster send each other about key epochs: one
# committed a rotation, stored copies for members, or has a member asking.
ROTATED_NOTICE = "key_rotated"
SHARED_NOTICE = "key_shared"
WANTED_NOTICE = "key_wanted"


@attr.s(slots=True)
class _Staged:
    """
    The parts of one rotation received so far from one connection.
    """

    session = attr.ib()
    connection = attr.ib()
    epoch = attr.ib()
    started_at = attr.ib()
    copies = attr.ib(factory=dict)  # member id -> sealed key


class MeshKeys:
    """
    Key epochs of every mesh: the current epoch of each (cached once read),
    rotations being uploaded, and the requests of C{docs/protocol.md}.

    @param store: the L{IStore}.
    @param writes: the broker's L{GroupCommit}; a rotation waits for what
        it holds, so every message accepted under the old epoch is stored
        before the new one begins.
    @param clock: the broker's clock.
    @param meshes: the broker's L{MeshDirectory}, where the sessions a
        notice from another node is about are found.
    @param cluster: this node's L{Cluster} (issue 15), or C{None} alone.
    """

    _log = Logger()

    def __init__(self, store, writes, clock, meshes=None, cluster=None):
        self._store = store
        self._writes = writes
        self._clock = clock
        self._meshes = meshes
        self._cluster = cluster
        if cluster is not None:
            # Issue 15: the other nodes of a cluster keep epochs of their own.
            cluster.on(ROTATED_NOTICE, self._rotated_elsewhere)
            cluster.on(SHARED_NOTICE, self._shared_elsewhere)
            cluster.on(WANTED_NOTICE, self._wanted_elsewhere)
            cluster.on_rescan(self._rescan)
        self._rereading = set()
        self._epochs = {}
        self._staged = {}  # presence id -> _Staged
        # (mesh id, epoch, member id) whose missing copy the moderators were
        # told about in this process: told once.
        self._wanted = set()

    def _now(self):
        return int(self._clock.seconds() * 1000)

    def _push(self, mesh, event, data, sessions):
        push_system(mesh, event, data, sessions, self._now())

    # -- the current epoch -------------------------------------------------------

    def epoch_of(self, mesh):
        """
        The mesh's current key epoch (a L{Deferred}; from memory once read).
        """
        epoch = self._epochs.get(mesh.id)
        if epoch is not None:
            return defer.succeed(epoch)
        d = self._store.current_key_epoch(mesh.id)

        def read(epoch):
            return self._epochs.setdefault(mesh.id, epoch)

        return d.addCallback(read)

    @defer.inlineCallbacks
    def hello_fields(self, mesh, member):
        """
        What a C{hello_ack} adds: C{keyEpoch} for everyone, and for owners
        and admins C{keyStatus} — who left or was banned since the key last
        changed, and which members have no copy of the current key.
        """
        if member.role not in MODERATORS:
            if self._clustered():
                # Another node may have rotated and its notice be late or
                # lost: a hello never hands out an epoch older than the store's.
                epoch = yield self._store.current_key_epoch(mesh.id)
                self._advance(mesh.id, epoch, {"epoch": epoch})
            epoch = yield self.epoch_of(mesh)
            return {"keyEpoch": epoch}
        report = yield self._store.mesh_key_report(mesh.id, REPORT_LIMIT)
        self._advance(mesh.id, report.epoch, {"epoch": report.epoch})
        departed = list(report.departures)
        return {"keyEpoch": report.epoch, "keyStatus": {
            "departedSinceRotation": [{
                "name": d.name, "pubkey": d.pubkey,
                "event": "banned" if d.event_type == "member_banned" else "left",
                "at": iso_millis(d.at)} for d in departed[-REPORT_LIMIT:]],
            "departedTotal": len(departed),
            "withoutKey": [{"name": m.display_name, "memberPubkey": m.pubkey}
                           for m in report.without_copy],
            # Banned when the current key was made, unbanned since: only a
            # rotation gives them a key (decision 87).
            "unbannedSinceRotation": [{"name": m.display_name, "memberPubkey": m.pubkey}
                                      for m in report.shut_out],
        }}

    @defer.inlineCallbacks
    def status(self, session, frame):
        """
        C{mesh_key_status}: what a C{hello_ack} says of the mesh key, now.
        """
        fields = yield self.hello_fields(session.mesh, session.member)
        return protocol.MeshKeyStatusResult(**fields).to_wire()

    def refuse_send(self, session, frame, broadcast):
        """
        Why a C{send} must be refused for its key epoch, as C{(error,
        current epoch)}, or C{None}. Only broadcasts and group messages are
        sealed with the mesh key; a direct message's C{keyEpoch} is ignored.
        """
        if not broadcast:
            return None
        # The hello that made this session read the epoch.
        current = self._epochs.get(session.mesh.id, 0)
        if frame.keyEpoch == current:
            return None
        if frame.keyEpoch < current:
            return ("stale_key_epoch: sealed under key epoch %d, but the mesh key was rotated:"
                    " the current epoch is %d — fetch its key and seal again"
                    % (frame.keyEpoch, current), current)
        # Another node may have committed it and its notice be late or lost:
        # read the store, so that the client's next try is judged by it.
        self._reread(session.mesh.id)
        return ("unknown_key_epoch: key epoch %d does not exist yet; the current epoch is %d"
                % (frame.keyEpoch, current), current)

    # -- rotation --------------------------------------------------------------------

    def _require_moderator(self, session, what):
        if session.member.role not in MODERATORS:
            raise Refusal("forbidden", "only owner or admin can %s" % (what,))

    def _members_of(self, session, pairs):
        """
        The member ids of C{pairs} (C{(member pubkey, sealed key)}), or a
        C{sealed_keys_mismatch} refusal naming the keys that are not members
        in good standing.
        """
        mesh = session.mesh
        copies, strangers = {}, []
        for pubkey, sealed in pairs:
            member = mesh.members_by_pubkey.get(pubkey)
            if member is None or member.revoked_at is not None:
                strangers.append(pubkey)
            else:
                copies[member.id] = sealed
        if strangers:
            raise Refusal(
                "sealed_keys_mismatch", ("1 sealed copy is for a key that is not a member of"
                                         if len(strangers) == 1 else
                                         "%d sealed copies are for keys that are not members of"
                                         % (len(strangers),))
                + " this mesh (banned, left, or never joined)",
                notMembers=strangers[:REPORT_LIMIT])
        return copies

    def sweep(self):
        """
        Drop the parts of rotations whose connection went away (the session
        reconnected, or ended) or that were started over L{STAGING_SECONDS}
        ago: an unfinished rotation holds no memory past its connection.
        Called by the broker's periodic sweep and before each part.
        """
        now = self._now()
        for presence_id, staged in list(self._staged.items()):
            if (staged.session.connection is not staged.connection
                    or now - staged.started_at > STAGING_SECONDS * 1000):
                del self._staged[presence_id]

    def _unstage(self, session):
        return self._staged.pop(session.presence_id, None)

    @defer.inlineCallbacks
    def rotate(self, session, frame):
        """
        C{rotate_mesh_key}: stage one part of a new epoch, and commit it
        with the last.
        """
        self._require_moderator(session, "rotate the mesh key")
        mesh = session.mesh
        now = self._now()
        self.sweep()
        staged = self._staged.get(session.presence_id)
        if staged is not None and (staged.connection is not session.connection
                                   or staged.epoch != frame.epoch):
            # A part of another rotation: the unfinished one is dropped.
            staged = None
            self._unstage(session)
        current = yield self.epoch_of(mesh)
        try:
            if frame.epoch != current + 1:
                raise Refusal("key_epoch_conflict", "the next key epoch is %d, not %d (another"
                              " rotation happened meanwhile?)" % (current + 1, frame.epoch),
                              currentEpoch=current)
            copies = self._members_of(session, frame.sealedKeys)
            if staged is None:
                staged = _Staged(session, session.connection, frame.epoch, now)
            again = [mid for mid in copies if mid in staged.copies]
            if again:
                raise Refusal("malformed", "field 'sealedKeys' names member %s… again (an"
                              " earlier part of this rotation had it)"
                              % (mesh.members[again[0]].pubkey[:16],))
        except Refusal:
            self._unstage(session)
            raise
        staged.copies.update(copies)
        if frame.more:
            self._staged[session.presence_id] = staged
            return protocol.RotateMeshKeyAck(epoch=frame.epoch, committed=False,
                                             staged=len(staged.copies)).to_wire()
        self._unstage(session)
        missing = [m.pubkey for m in mesh.members.values()
                   if m.revoked_at is None and m.id not in staged.copies]
        if missing:
            raise Refusal("sealed_keys_mismatch", "1 current member has no sealed copy"
                          if len(missing) == 1 else
                          "%d current members have no sealed copy" % (len(missing),),
                          missing=missing[:REPORT_LIMIT],
                          currentEpoch=current)
        result = yield self._commit(session, frame, staged, now)
        return result

    @defer.inlineCallbacks
    def _commit(self, session, frame, staged, now):
        mesh, member = session.mesh, session.member
        reason = frame.reason or DEFAULT_REASON
        rotation = KeyRotation(mesh.id, frame.epoch, member.id, member.pubkey, reason, now,
                               tuple(sorted(staged.copies.items())))
        audit = AuditEvent(mesh.id, "mesh_key_rotated", member.id, {
            "epoch": frame.epoch, "by": member.display_name, "reason": reason}, now)
        # Messages accepted under the old epoch are stored before it ends.
        yield self._writes.flushed()
        try:
            outcome = yield self._store.rotate_mesh_key(rotation, [audit])
        except DuplicateKey:
            # Another node committed this epoch at the same moment.
            self._epochs.pop(mesh.id, None)
            current = yield self.epoch_of(mesh)
            raise Refusal("key_epoch_conflict", "key epoch %d was committed by another rotation"
                          % (frame.epoch,), currentEpoch=current) from None
        if not outcome.stored:
            self._epochs[mesh.id] = outcome.current_epoch
            if outcome.missing or outcome.unexpected:
                # Someone joined, left or was banned since the client read
                # the members: it reads them again and retries.
                names = mesh.members
                raise Refusal(
                    "sealed_keys_mismatch", "the members changed while the copies were sealed",
                    missing=[names[m].pubkey for m in outcome.missing if m in names],
                    notMembers=[names[m].pubkey for m in outcome.unexpected if m in names],
                    currentEpoch=outcome.current_epoch)
            raise Refusal("key_epoch_conflict", "key epoch %d was committed by another rotation"
                          % (frame.epoch,), currentEpoch=outcome.current_epoch)
        self._log.info("mesh {mesh_id}: key rotated to epoch {epoch} for {count} members",
                       mesh_id=mesh.id, epoch=frame.epoch, count=len(staged.copies))
        announced = {"epoch": frame.epoch, "by": member.display_name,
                     "byPubkey": member.pubkey}
        self._notice(ROTATED_NOTICE, mesh.id, announced)
        self._advance(mesh.id, frame.epoch, announced)
        return protocol.RotateMeshKeyAck(epoch=frame.epoch, committed=True,
                                         members=len(staged.copies)).to_wire()

    # -- sharing the current key with members who have no copy -----------------------

    @defer.inlineCallbacks
    def share(self, session, frame):
        """
        C{share_mesh_key}: copies of the current key for members without one.
        """
        self._require_moderator(session, "share the mesh key")
        mesh = session.mesh
        current = yield self.epoch_of(mesh)
        if frame.epoch != current or current == 0:
            raise Refusal("key_epoch_conflict", "copies can only be shared for the current key"
                          " epoch, %d" % (current,), currentEpoch=current)
        copies = self._members_of(session, frame.sealedKeys)
        outcome = yield self._store.share_mesh_key(
            mesh.id, frame.epoch, tuple(sorted(copies.items())), session.member.pubkey,
            self._now())
        if not outcome.stored:
            self._epochs[mesh.id] = outcome.current_epoch
            if outcome.shut_out:
                shut_out = [mesh.members[m] for m in outcome.shut_out if m in mesh.members]
                raise Refusal("sealed_keys_mismatch", "key epoch %d was made while %s %s"
                              " banned: it is not shared with them; rotate the key instead"
                              % (frame.epoch, ", ".join(m.display_name for m in shut_out[:5]),
                                 "was" if len(shut_out) == 1 else "were"),
                              shutOut=[m.pubkey for m in shut_out][:REPORT_LIMIT])
            if outcome.unexpected:
                raise Refusal("sealed_keys_mismatch", "some copies are for keys that are not"
                              " members of this mesh any more",
                              notMembers=[mesh.members[m].pubkey for m in outcome.unexpected
                                          if m in mesh.members])
            raise Refusal("key_epoch_conflict", "the key was rotated meanwhile",
                          currentEpoch=outcome.current_epoch)
        self._notice(SHARED_NOTICE, mesh.id, {"epoch": frame.epoch, "members": list(copies)})
        self._tell_shared(mesh, frame.epoch, copies)
        return protocol.ShareMeshKeyAck(epoch=frame.epoch, shared=outcome.shared).to_wire()

    # -- a member's own copy ------------------------------------------------------------

    @defer.inlineCallbacks
    def get(self, session, frame):
        """
        C{get_mesh_key}: the caller's member's sealed copy of an epoch's key.
        """
        mesh, member = session.mesh, session.member
        if frame.epoch == 0:
            raise Refusal("no_sealed_key", "key epoch 0 is the key of the invite link; no copy"
                          " of it is sealed", epoch=0)
        copy = yield self._store.get_mesh_key_copy(mesh.id, frame.epoch, member.id)
        if copy is None:
            current = yield self.epoch_of(mesh)
            made_at = None
            if frame.epoch == current:
                made_at = yield self._store.key_epoch_made_at(mesh.id, current)
            if made_at is not None and member.joined_at < made_at:
                # Banned when it was made: never shared (decision 87).
                raise Refusal("no_sealed_key", "key epoch %d was made while this member was"
                              " banned, so it is not shared with it; the next rotation by an"
                              " owner or admin seals a key for it" % (current,),
                              epoch=frame.epoch, currentEpoch=current, bannedWhenMade=True)
            if frame.epoch == current:
                self._want(mesh, member, current)
            raise Refusal("no_sealed_key", "no copy of key epoch %d is sealed for this member"
                          % (frame.epoch,), epoch=frame.epoch, currentEpoch=current)
        return protocol.MeshKey(epoch=copy.epoch, sealedKey=copy.sealed_key,
                                sealedBy=copy.sealed_by).to_wire()

    def _want(self, mesh, member, epoch, notice=True):
        """
        Tell the live owners and admins, once, that C{member} has no copy of
        the current key: a client of theirs that holds it shares one.
        """
        wanted = (mesh.id, epoch, member.id)
        if wanted in self._wanted:
            return
        self._wanted.add(wanted)
        if notice:
            self._notice(WANTED_NOTICE, mesh.id, {"epoch": epoch, "member": member.id})
        moderators = [s for s in mesh.sessions.values()
                      if s.member.role in MODERATORS and s.member.id != member.id]
        self._push(mesh, "mesh_key_wanted", {
            "epoch": epoch, "name": member.display_name, "memberPubkey": member.pubkey},
            moderators)

    def _tell_shared(self, mesh, epoch, member_ids):
        recipients = [s for mid in member_ids for s in mesh.sessions_of(mid)]
        self._push(mesh, "mesh_key_shared", {"epoch": epoch}, recipients)

    # -- the other nodes of a cluster (issue 15) ------------------------------------------

    def _clustered(self):
        return self._cluster is not None and self._cluster.clustered

    def _notice(self, kind, mesh_id, data):
        if self._cluster is not None:
            self._cluster.notice(kind, mesh_id, **data)

    def _advance(self, mesh_id, epoch, announced):
        """
        C{epoch} is committed: from now on it is the current one here, and
        this node's live sessions of the mesh hear C{mesh_key_rotated}. An
        epoch never goes back, so late or repeated news changes nothing.
        """
        if epoch <= self._epochs.get(mesh_id, -1):
            return
        self._epochs[mesh_id] = epoch
        self._wanted = {w for w in self._wanted if w[0] != mesh_id}
        mesh = self._meshes.cached(mesh_id) if self._meshes is not None else None
        if mesh is not None:
            self._push(mesh, "mesh_key_rotated", announced, list(mesh.sessions.values()))

    def _rotated_elsewhere(self, notice):
        epoch = notice.data.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            return
        announced = {"epoch": epoch}
        for field in ("by", "byPubkey"):
            if isinstance(notice.data.get(field), str):
                announced[field] = notice.data[field]
        self._advance(notice.mesh_id, epoch, announced)

    def _shared_elsewhere(self, notice):
        mesh = self._meshes.cached(notice.mesh_id) if self._meshes is not None else None
        members = notice.data.get("members")
        if mesh is None or not isinstance(members, list):
            return
        self._tell_shared(mesh, notice.data.get("epoch"),
                          [m for m in members if isinstance(m, str)])

    def _wanted_elsewhere(self, notice):
        mesh = self._meshes.cached(notice.mesh_id) if self._meshes is not None else None
        member = mesh.members.get(notice.data.get("member")) if mesh is not None else None
        epoch = notice.data.get("epoch")
        if member is not None and isinstance(epoch, int) and not isinstance(epoch, bool):
            self._want(mesh, member, epoch, notice=False)

    def _reread(self, mesh_id):
        """
        Read the mesh's current epoch from the store again (one read at a
        time per mesh), and act on a newer one as on its notice.
        """
        if mesh_id in self._rereading or not self._clustered():
            return
        self._rereading.add(mesh_id)
        d = self._store.current_key_epoch(mesh_id)
        d.addCallback(lambda epoch: self._advance(mesh_id, epoch, {"epoch": epoch}))
        d.addErrback(lambda f: self._log.warn(
            "could not read the key epoch of mesh {mesh_id}: {error}", mesh_id=mesh_id,
            error=f.getErrorMessage()[:200]))
        d.addBoth(lambda _: self._rereading.discard(mesh_id))

    def _rescan(self, reopen=False):
        """
        Notices may have been missed: read again the epoch of every mesh
        this node knows one of.
        """
        for mesh_id in list(self._epochs):
            self._reread(mesh_id)
