"""
The client's mesh keys (issue 17): every key epoch's key this member holds,
and what a client does about epochs.

A mesh starts at key epoch 0, the key of its invite links. When an owner or
admin rotates (L{EpochKeys.rotate}), its client makes a fresh key, seals a
copy to every current member's key (L{crypto.seal_mesh_key}) and uploads the
copies; the broker commits them as epoch N+1 and refuses broadcasts sealed
under an older epoch from then on. Every client then:

  - seals broadcasts and group messages under the broker's current epoch
    (C{keyEpoch} of C{hello_ack} and of C{mesh_key_rotated} events), asking
    for its sealed copy of that epoch's key (C{get_mesh_key}) when it has
    none, and sealing again once when a send is refused C{stale_key_epoch};
  - opens each push with the key of the push's C{keyEpoch}, asking for a
    missing epoch's copy once (pushes behind it wait, in order), and says
    clearly when it cannot (L{messages.never_received});
  - keeps every key it had in its key ring, so old messages stay readable;
  - as an owner or admin holding the current key, seals a copy for members
    the broker says have none (they joined with an invite made before the
    rotation): at hello (C{keyStatus.withoutKey}) and when one asks
    (C{mesh_key_wanted}).

The key ring (every epoch's key this member holds) is
L{claudemesh.client.keyring}.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger

from claudemesh import crypto
from claudemesh.client import config as configuration
from claudemesh.client import messages

MODERATORS = ("owner", "admin")
# How many times a rotation is tried again when the members or the epoch
# changed while its copies were sealed.
ROTATE_ATTEMPTS = 3
# Frame room for a rotation part when the broker does not say its limit
# (its default is 65536 bytes), and what each part leaves for the envelope.
DEFAULT_FRAME_BYTES = 65536
FRAME_ENVELOPE_BYTES = 512


class NoKey(Exception):
    """
    This member holds no key for the epoch it must seal under.
    """


class RefusedCopy(Exception):
    """
    A sealed copy of a mesh key this client does not take.
    """


def _sealer_text(sealer):
    # The broker's words: shown only when they are a key (no escapes).
    if crypto.is_pubkey(sealer):
        return "the key %s…" % (sealer[:16],)
    return "no member key"


def open_sealed_copy(identity, mesh_id, epoch, reply, members):
    """
    The key of C{epoch} from the broker's C{mesh_key} reply to
    C{get_mesh_key}, taken only when its C{sealedBy} is the member key of a
    member C{members} (C{members_list} rows) names as an owner or admin of
    the mesh. Every client (CLI, MCP server, UI) opens copies here.

    Both are the broker's word: a dishonest broker can still seal a key of
    its own making, but only by listing a member of its own as an admin,
    whom C{claudemesh members} and the audit log show; without this check
    it could use any key pair, seen nowhere (docs/security.md).

    @raise RefusedCopy: sealed by anyone else, or not opening as the key
        of C{epoch} of this mesh for this member.
    """
    sealer = reply.get("sealedBy")
    roles = {m.get("memberPubkey"): m.get("role") for m in members if isinstance(m, dict)}
    if not isinstance(sealer, str) or roles.get(sealer) not in MODERATORS:
        raise RefusedCopy(
            "refused the mesh key of epoch %d: its copy was sealed by %s, which is not an"
            " owner or admin of this mesh; the key was not stored" % (epoch, _sealer_text(sealer)))
    try:
        return crypto.open_mesh_key(identity, sealer, mesh_id, epoch,
                                    reply.get("sealedKey") or "")
    except crypto.DecryptionFailed:
        raise RefusedCopy("refused the mesh key of epoch %d: its sealed copy does not open as"
                          " this mesh's key of that epoch; the key was not stored"
                          % (epoch,)) from None


def _epoch(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


class EpochKeys:
    """
    The key epochs of one L{MeshClient}'s mesh.

    @ivar current: the broker's current epoch, once known.
    @ivar status: the last C{hello_ack}'s C{keyStatus} (owners and admins).
    @ivar shared: C{(name, epoch)} of the copies this client sealed for
        members who had none.
    @ivar rotated: the epoch this client rotated to, if it did.
    @ivar refused: epoch → why this member has no key for it: its sealed
        copy was refused (L{open_sealed_copy}), or the broker says it was
        banned when the epoch was made (never shared with it).
    """

    _log = Logger()
    # The largest frame to build, when not the broker's (tests set it).
    frame_bytes = None

    def __init__(self, client, ring):
        self.client = client
        self.ring = ring
        self.current = None
        self.status = None
        self.shared = []
        self.rotated = None
        self.refused = {}
        self._fetching = {}
        self._asked = set()
        self._held = None
        self._work = set()

    @property
    def _entry(self):
        return self.client.mesh

    def _request(self, frame):
        return self.client.request(frame, timeout=10.0)

    def _track(self, d):
        """
        Remember C{d} until it fires, for L{settled}.
        """
        self._work.add(d)
        d.addBoth(lambda result: (self._work.discard(d), result)[1])
        return d

    def settled(self):
        """
        Fires once the key work under way (fetches, shares) is done: a
        one-shot command waits for it before it closes.
        """
        if not self._work:
            return defer.succeed(None)
        return defer.DeferredList(list(self._work), consumeErrors=True).addCallback(
            lambda _: self.settled())

    def key_of(self, epoch):
        return self.ring.get(epoch)

    def _moderator(self):
        ack = self.client.hello_ack or {}
        return ack.get("role", self._entry.role) in MODERATORS

    # -- what the broker says ----------------------------------------------------------

    def hello(self, ack):
        """
        A C{hello_ack}: its epoch becomes the current one, whose key is
        fetched when missing; an owner or admin shares the current key with
        the members it lists as having none.
        """
        epoch = _epoch(ack.get("keyEpoch"))
        if epoch is None:
            # A broker from before issue 17: epoch 0 only.
            self.current = 0
            return
        self.current = epoch
        status = ack.get("keyStatus")
        self.status = status if isinstance(status, dict) else None
        # A new connection may find what an earlier one could not, and a
        # fetch written on the connection that dropped fails.
        self._asked.clear()
        self._fetching.clear()
        fetched = defer.succeed(None)
        if epoch and self.ring.get(epoch) is None:
            fetched = self._track(self.fetch(epoch))
        without = (self.status or {}).get("withoutKey")
        if isinstance(without, list) and without:
            fetched.addCallback(lambda _: self._track(self._share_when_held(epoch, without)))

    def event(self, frame):
        """
        A system push; the key epoch ones are acted on.
        """
        name = frame.get("event")
        data = frame.get("eventData")
        if not isinstance(data, dict):
            return
        epoch = _epoch(data.get("epoch"))
        if epoch is None:
            return
        if name in ("mesh_key_rotated", "mesh_key_shared"):
            if self.current is None or epoch > self.current:
                self.current = epoch
            self._asked.discard(epoch)
            if self.ring.get(epoch) is None:
                self._track(self.fetch(epoch))
        elif name == "mesh_key_wanted" and self._moderator():
            self._track(self._share_when_held(epoch, [data]))

    # -- fetching a copy --------------------------------------------------------------

    def fetch(self, epoch):
        """
        Ask for this member's sealed copy of C{epoch}'s key, once per epoch
        and connection. Fires with the key, or C{None} when there is none
        to be had; never fails.
        """
        if self.ring.get(epoch) is not None:
            return defer.succeed(self.ring.get(epoch))
        if epoch == 0 or epoch in self._asked:
            return defer.succeed(None)
        running = self._fetching.get(epoch)
        if running is None:
            running = self._fetching[epoch] = self._fetch(epoch)

            def done(result, running=running):
                if self._fetching.get(epoch) is running:
                    del self._fetching[epoch]
                return result

            running.addBoth(done)
        d = defer.Deferred()
        running.addBoth(lambda key: (d.callback(key), key)[1])
        return d

    @defer.inlineCallbacks
    def _fetch(self, epoch):
        from claudemesh.client.errors import ClientError, RequestError

        entry = self._entry
        try:
            reply = yield self._request({"type": "get_mesh_key", "epoch": epoch})
        except RequestError as e:
            if e.code in ("no_sealed_key", "unknown_type"):
                self._asked.add(epoch)
                if e.frame.get("bannedWhenMade") is True:
                    self.refused[epoch] = (
                        "this member was banned when the mesh key of epoch %d was made, so"
                        " that key is never shared with it: the next rotation by an owner or"
                        " admin seals a fresh key for it" % (epoch,))
            else:
                self._log.warn("could not fetch the mesh key of epoch {epoch}: {code}",
                               epoch=epoch, code=e.code)
            return None
        except ClientError:
            return None
        try:
            # Who may seal a copy: asked after the copy, so a role granted
            # meanwhile counts.
            members = yield self.members()
        except ClientError:
            return None
        try:
            key = open_sealed_copy(entry.identity, entry.meshId, epoch, reply, members)
        except RefusedCopy as e:
            self._asked.add(epoch)
            self.refused[epoch] = str(e)
            self._log.warn("{refusal}", refusal=str(e))
            return None
        self.refused.pop(epoch, None)
        self._keep(epoch, key)
        return key

    def _keep(self, epoch, key):
        try:
            self.ring.put(epoch, key)
        except (OSError, configuration.ConfigError) as e:
            # Held in memory; the copy stays on the broker for next time.
            self._log.warn("could not write the key ring: {error}", error=str(e)[:200])

    # -- sealing ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def sealing_key(self):
        """
        C{(epoch, key)} to seal a broadcast with: the broker's current
        epoch's key, fetched when missing.

        @raise NoKey: when this member cannot get it.
        """
        epoch = self.current
        if epoch is None:
            epoch = self.ring.newest() or 0
        key = yield self.fetch(epoch)
        if key is None:
            if epoch == 0:
                raise NoKey("this mesh has no mesh key in the config; broadcasts need one")
            if epoch in self.refused:
                raise NoKey(self.refused[epoch])
            raise NoKey("this member has no key for the mesh's current key epoch %d: an owner"
                        " or admin's client seals one for it when it next connects" % (epoch,))
        return epoch, key

    def stale(self, ack):
        """
        A send refused C{stale_key_epoch}: learn the current epoch it names.
        Returns whether sealing again may help.
        """
        epoch = _epoch(ack.get("currentEpoch"))
        if epoch is None or (self.current is not None and epoch < self.current):
            return False
        self.current = epoch
        self._asked.discard(epoch)
        return True

    # -- opening pushes in order -------------------------------------------------------

    def admit(self, frame, hand):
        """
        Hand a message push to C{hand} once the key of its epoch is here (or
        known to be out of reach), keeping the order of pushes.
        """
        if self._held is not None:
            self._held.append(frame)
            return
        epoch = messages.push_key_epoch(frame) if messages.is_broadcast(
            frame.get("targetSpec") or "") else None
        if (epoch is not None and epoch and self.ring.get(epoch) is None
                and epoch not in self._asked):
            self._held = [frame]
            self._track(self.fetch(epoch)).addCallback(lambda _: self._release(hand))
            return
        hand(frame)

    def _release(self, hand):
        held, self._held = self._held or [], None
        while held:
            self.admit(held.pop(0), hand)
            if self._held is not None:
                # Waiting for another epoch's key: the rest wait behind it.
                self._held.extend(held)
                return

    # -- owners and admins ---------------------------------------------------------------

    def invite_key(self):
        """
        C{(epoch, key)} for an invite link: the current epoch's key.

        @raise NoKey: when this member does not hold it.
        """
        epoch = self.current if self.current is not None else (self.ring.newest() or 0)
        key = self.ring.get(epoch)
        if key is None and epoch in self.refused:
            raise NoKey(self.refused[epoch])
        if key is None:
            raise NoKey("this member does not hold the mesh key of the current epoch %d: an"
                        " invite with an older one could not read broadcasts" % (epoch,))
        return epoch, key

    def _parts(self, frame, entries):
        """
        C{frame} copies, each holding as many C{sealedKeys} entries as fit in
        a frame the broker takes.
        """
        limit = (self.frame_bytes or getattr(self.client, "max_frame_bytes", None)
                 or DEFAULT_FRAME_BYTES)
        room = limit - FRAME_ENVELOPE_BYTES
        parts, current, size = [], [], 0
        for entry in entries:
            cost = len(json.dumps(entry, separators=(",", ":"))) + 1
            if current and size + cost > room:
                parts.append(current)
                current, size = [], 0
            current.append(entry)
            size += cost
        parts.append(current)
        return [dict(frame, sealedKeys=part) for part in parts]

    def _seal_for(self, epoch, key, members):
        entry = self._entry
        return [{"memberPubkey": m["memberPubkey"], "sealedKey": crypto.seal_mesh_key(
            entry.identity, m["memberPubkey"], entry.meshId, epoch, key)} for m in members]

    @defer.inlineCallbacks
    def _share_when_held(self, epoch, members):
        """
        Seal the key of C{epoch} (the current one) for C{members} (C{{name,
        memberPubkey}}) when this client holds it; never fails.
        """
        from claudemesh.client.errors import ClientError

        key = self.ring.get(epoch)
        members = [m for m in members if isinstance(m, dict)
                   and crypto.is_pubkey(m.get("memberPubkey"))
                   and m["memberPubkey"] != self._entry.pubkey]
        if not epoch or key is None or epoch != self.current or not members:
            return
        try:
            for frame in self._parts({"type": "share_mesh_key", "epoch": epoch},
                                     self._seal_for(epoch, key, members)):
                yield self._request(frame)
        except ClientError as e:
            self._log.warn("could not share the mesh key of epoch {epoch}: {error}",
                           epoch=epoch, error=e.message)
            return
        for m in members:
            self.shared.append((m.get("name") or m["memberPubkey"][:8], epoch))

    @defer.inlineCallbacks
    def members(self):
        """
        Every current member (C{members_list} rows), through all its pages.
        """
        rows, cursor = [], None
        while True:
            frame = {"type": "list_members"}
            if cursor is not None:
                frame["cursor"] = cursor
            reply = yield self._request(frame)
            rows.extend(m for m in reply.get("members", []) if isinstance(m, dict))
            cursor = reply.get("nextCursor")
            if not isinstance(cursor, str):
                return rows

    @defer.inlineCallbacks
    def rotate(self, reason=None):
        """
        Rotate the mesh key: a fresh key sealed for every current member,
        uploaded in parts that each fit a frame, committed by the last. When
        the members or the epoch changed meanwhile, start again (a few
        times). Fires with C{(epoch, members)} once committed; fails with
        the broker's L{RequestError} otherwise.
        """
        from claudemesh.client.errors import RequestError

        for attempt in range(ROTATE_ATTEMPTS):
            members = yield self.members()
            epoch = (self.current or 0) + 1
            key = crypto.new_mesh_key()
            frame = {"type": "rotate_mesh_key", "epoch": epoch}
            if reason:
                frame["reason"] = reason
            parts = self._parts(frame, self._seal_for(epoch, key, members))
            try:
                for index, part in enumerate(parts):
                    if index < len(parts) - 1:
                        part["more"] = True
                    yield self._request(part)
            except RequestError as e:
                if e.code == "key_epoch_conflict":
                    # Someone else rotated: build on their epoch.
                    current = _epoch(e.frame.get("currentEpoch"))
                    if current is not None:
                        self.current = current
                if (e.code in ("key_epoch_conflict", "sealed_keys_mismatch")
                        and attempt + 1 < ROTATE_ATTEMPTS):
                    continue
                raise
            self.current = self.rotated = epoch
            self._keep(epoch, key)
            return epoch, [m.get("name") or m["memberPubkey"][:8] for m in members]
        raise AssertionError("unreachable")

    @defer.inlineCallbacks
    def refresh_status(self):
        """
        Ask the broker again who left since the last rotation
        (C{mesh_key_status}), as an owner or admin; a broker without the
        request leaves the hello's answer. Never fails.
        """
        from claudemesh.client.errors import ClientError

        if not self._moderator():
            return
        try:
            reply = yield self._request({"type": "mesh_key_status"})
        except ClientError:
            return
        status = reply.get("keyStatus")
        if isinstance(status, dict):
            self.status = status
        epoch = _epoch(reply.get("keyEpoch"))
        if epoch is not None and (self.current is None or epoch > self.current):
            self.current = epoch

    def describe(self):
        """
        One line on the mesh key for an owner's or admin's view of its mesh
        (C{mesh_info}): the current epoch, whether its key is held, and who
        left since it was rotated.
        """
        epoch = self.current if self.current is not None else 0
        if self.ring.get(epoch) is not None:
            held = "held"
        else:
            held = "not held: broadcasts unreadable"
            if epoch in self.refused:
                held += "; " + self.refused[epoch]
        line = "key epoch %d (%s)" % (epoch, held)
        status = self.status or {}
        departed = status.get("departedSinceRotation")
        if self._moderator() and isinstance(departed, list) and departed:
            line += "; " + departure_notice(departed, status.get("departedTotal"))
        unbanned = self.unbanned()
        if self._moderator() and unbanned:
            line += "; " + unbanned_notice(unbanned, epoch)
        return line

    def unbanned(self):
        """
        The members (C{{name, memberPubkey}}) the broker says were banned
        when the current key was made and are unbanned since: only a
        rotation gives them a key (the broker never lets this epoch's be
        shared with them).
        """
        rows = (self.status or {}).get("unbannedSinceRotation")
        if not isinstance(rows, list):
            return []
        return [r for r in rows if isinstance(r, dict) and crypto.is_pubkey(r.get("memberPubkey"))]

    def notices(self):
        """
        What an owner's or admin's one-shot command says after it ran:
        members who left or were banned since the key was last rotated, and
        the copies it sealed for members who had none.
        """
        lines = []
        for name, epoch in self.shared:
            lines.append("sealed the mesh key (epoch %d) for %s, who joined after it was"
                         " rotated" % (epoch, name))
        status = self.status or {}
        departed = status.get("departedSinceRotation")
        if self.rotated is None and isinstance(departed, list) and departed:
            lines.append(departure_notice(departed, status.get("departedTotal")))
        if self.rotated is None and self.unbanned():
            lines.append(unbanned_notice(self.unbanned(), self.current or 0))
        return lines


def unbanned_notice(rows, epoch):
    """
    One sentence for members who were banned when key epoch C{epoch} was
    made and are unbanned since (C{keyStatus.unbannedSinceRotation} rows).
    """
    names = [row.get("name") or row["memberPubkey"][:8] for row in rows[:5]]
    more = " (and %d more)" % (len(rows) - len(names),) if len(rows) > len(names) else ""
    return ("%s%s %s unbanned after the mesh key (epoch %d) was made without them: that key"
            " is never shared with them (it sealed what was broadcast during the ban), so they"
            " cannot read broadcasts until the key is rotated. Run 'claudemesh rotate-key'."
            % (", ".join(names), more, "was" if len(rows) == 1 else "were", epoch))


def departure_notice(departed, total=None):
    """
    One sentence for members who left or were banned since the last
    rotation (C{keyStatus.departedSinceRotation} rows).
    """
    described = []
    for row in departed[-5:]:
        name = row.get("name") or (row.get("pubkey") or "?")[:8]
        described.append("%s %s" % (name, "was banned" if row.get("event") == "banned"
                                    else "left"))
    total = total if isinstance(total, int) and total > len(departed) else len(departed)
    more = " (and %d more)" % (total - len(described),) if total > len(described) else ""
    return ("%s%s since the mesh key was last rotated: they can still read broadcasts sealed"
            " with it. Run 'claudemesh rotate-key'." % (", ".join(described), more))
