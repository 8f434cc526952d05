"""
Status: what each session says it is doing (status, summary, groups), and
the rules that decide which signal wins.

The rules are pure functions of their inputs (L{apply_signal}, L{decay},
L{may_receive}); L{StatusBoard} applies them to sessions, answers
C{set_status}, C{set_summary}, C{join_group} and C{leave_group}, decays
C{working} on a timer, and tells the watching sessions what changed.

Sources rank hook > manual > jsonl. A signal of equal or higher rank replaces
the status. A lower-rank signal applies only once the current status is older
than the hook freshness window; while it is fresh, a lower-rank signal that
agrees with it only refreshes its time (so a transcript that keeps saying
"working" keeps a hook's "working" from decaying). C{dnd} is cleared only by a
manual signal.
"""

import attr

from claudemesh import protocol
from claudemesh.audit import iso_millis
from claudemesh.broker import pages
from claudemesh.broker.events import broadcast_system

RANK = {"jsonl": 1, "manual": 2, "hook": 3}
# What each status lets through (docs/protocol.md, delivery: gating).
DELIVERABLE = {
    "idle": ("now", "next", "low"),
    "working": ("now",),
    "dnd": ("now",),
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StatusState:
    status: str
    source: str
    updated_at: int


def apply_signal(current, status, source, now, fresh_window_ms):
    """
    The status after a signal, or C{None} when the signal changes nothing.
    """
    if current.status == "dnd" and status != "dnd" and source != "manual":
        return None
    if RANK[source] >= RANK[current.source]:
        return StatusState(status, source, now)
    fresh = now - current.updated_at <= fresh_window_ms
    if not fresh:
        return StatusState(status, source, now)
    if status == current.status:
        return StatusState(current.status, current.source, now)
    return None


def decay(current, now, ttl_ms):
    """
    C{working} without a refresh for the TTL becomes C{idle}, attributed to
    the lowest source so that the next hook or manual signal wins at once.
    Returns C{None} when nothing decays.
    """
    if current.status == "working" and now - current.updated_at >= ttl_ms:
        return StatusState("idle", "jsonl", now)
    return None


def may_receive(status, priority) -> bool:
    return priority in DELIVERABLE[status]


def _valid_role(role):
    return role is None or (isinstance(role, str) and len(role) <= protocol.MAX_NAME_LENGTH
                            and not protocol.has_nul(role))


def _group_entry(name, role):
    entry = {"name": name}
    if role:
        entry["role"] = role
    return entry


def peer_row(session):
    """
    The C{peers_list} entry of a session (also the data of C{peer_status}).
    """
    s = session
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


class StatusBoard:
    """
    The status part of the broker core.

    @param delivery: woken when a session turns idle or joins a group, since
        held deliveries may then go out.
    """

    def __init__(self, meshes, writes, delivery, clock, settings,
                 notify=lambda kind, mesh_id, **data: None):
        """
        @param notify: queues a notice for the other nodes (issue 15): the
            session's row changed, and whether they tell their watchers.
        """
        self._notify = notify
        self._meshes = meshes
        self._writes = writes
        self._delivery = delivery
        self._clock = clock
        self._settings = settings

    def _now(self):
        return int(self._clock.seconds() * 1000)

    def _own_targets(self, session, session_id, all_sessions):
        # On every node (issue 15): another node's sessions of the member
        # are reached through a notice (_here).
        mesh, member_id = session.mesh, session.member.id
        mine = mesh.sessions_of(member_id) + mesh.remote_of(member_id)
        if all_sessions:
            # "All my sessions" are the member's peers, not a watching UI.
            return [s for s in mine if not s.watch]
        if session_id is None or session_id == session.session_id:
            return [session]
        for s in mine:
            if s.session_id == session_id:
                return [s]
        raise protocol.Refusal("not_found", "no session %r of yours is connected" % (session_id,))

    def _here(self, session, targets, op, **data):
        """
        The targets held by this node; the others' nodes get an C{own}
        notice to do C{op} to theirs (L{noticed_own}).
        """
        elsewhere = [t.presence_id for t in targets if t.remote]
        if elsewhere:
            self._notify("own", session.mesh.id, p=elsewhere, op=op, **data)
        return [t for t in targets if not t.remote]

    def set_status(self, session, frame):
        targets = self._own_targets(session, frame.sessionId, frame.all)
        for target in self._here(session, targets, "status", s=frame.status, src=frame.source):
            self.signal(target, frame.status, frame.source)

    def signal(self, session, status, source):
        """
        Apply a status signal from C{source}; C{True} when it changed the
        session's status state.
        """
        now = self._now()
        window = self._settings.hook_fresh_window_seconds * 1000
        new = apply_signal(session.status, status, source, now, window)
        if new is None:
            return False
        self._set(session, new)
        return True

    def _set(self, session, new):
        before = session.status.status
        session.status = new
        self._writes.update_session(session.presence_id, {
            "status": new.status, "status_source": new.source,
            "status_updated_at": new.updated_at})
        self._tell_watchers(session)
        if new.status == "idle" and before != "idle":
            # Held deliveries go out when the recipient turns idle.
            self._delivery.wake(session)

    def set_summary(self, session, frame):
        targets = self._own_targets(session, frame.sessionId, frame.all)
        for target in self._here(session, targets, "summary", summary=frame.summary):
            self._summary(target, frame.summary)

    def _summary(self, target, summary):
        target.summary = summary
        self._writes.update_session(target.presence_id, {"summary": summary})
        self._tell_watchers(target)

    def join_group(self, session, frame):
        # The calling session, another of its member's (sessionId) or all
        # of them (all: what the CLI's join-group sends).
        targets = self._own_targets(session, frame.sessionId, frame.all)
        for target in targets:
            if frame.name not in target.groups and len(target.groups) >= protocol.MAX_GROUPS:
                # The same cap as a hello's: a session's groups go into every
                # peers_list row and presence event about it (issue 11).
                raise protocol.Refusal(
                    "too_many_groups", "a session holds at most %d groups; leave one first"
                    % (protocol.MAX_GROUPS,))
        for target in self._here(session, targets, "join", name=frame.name, role=frame.role):
            self._join(target, frame.name, frame.role)

    def _join(self, target, name, role):
        target.groups[name] = role
        self._writes.update_session(target.presence_id, {"groups": tuple(sorted(target.groups))})
        self._tell_watchers(target)
        # Deliveries to @that-group may be waiting for a session in it.
        self._delivery.wake(target)

    def leave_group(self, session, frame):
        targets = self._own_targets(session, frame.sessionId, frame.all)
        for target in self._here(session, targets, "leave", name=frame.name):
            self._leave(target, frame.name)

    def _leave(self, target, name):
        if name in target.groups:
            del target.groups[name]
            self._writes.update_session(
                target.presence_id, {"groups": tuple(sorted(target.groups))})
            self._tell_watchers(target)

    def noticed_own(self, mesh, notice):
        """
        An C{own} notice from another node: a member's request (through
        that node) about its sessions held here — checked again, since a
        notice is only as good as its contents.
        """
        data = notice.data
        op, name, role = data.get("op"), data.get("name"), data.get("role")
        for presence_id in data.get("p", ()):
            target = mesh.sessions.get(presence_id)
            if target is None:
                continue
            if op == "status" and data.get("s") in DELIVERABLE and data.get("src") in RANK:
                self.signal(target, data["s"], data["src"])
            elif op == "summary" and (data.get("summary") is None or (
                    isinstance(data["summary"], str)
                    and len(data["summary"]) <= protocol.MAX_SUMMARY_LENGTH)):
                self._summary(target, data["summary"])
            elif op == "join" and protocol.is_valid_group(name) and _valid_role(role) and (
                    name in target.groups or len(target.groups) < protocol.MAX_GROUPS):
                self._join(target, name, role)
            elif op == "leave" and isinstance(name, str):
                self._leave(target, name)

    def _tell_watchers(self, session):
        """
        Tell the watching sessions that C{session}'s status, summary or
        groups changed (C{peer_status}, carrying its C{peers_list} row), on
        this node and, through a notice, on the others.
        """
        self._notify("sess", session.mesh.id, p=session.presence_id,
                     e="peer_status" if session.listed else None)
        if session.listed:
            row = peer_row(session)
            budget = self._settings.max_message_bytes
            if budget and pages.size_of(row) > budget:
                # As in peers_list: a row too large for a frame goes shortened.
                row = pages.shortened(row)
            broadcast_system(session, "peer_status", row, self._now(), watchers_only=True)

    def sweep(self):
        """
        C{working} without a refresh for the TTL decays to C{idle}.
        """
        now = self._now()
        ttl = self._settings.status_ttl_seconds * 1000
        for session in self._meshes.sessions():
            new = decay(session.status, now, ttl)
            if new is not None:
                self._set(session, new)
