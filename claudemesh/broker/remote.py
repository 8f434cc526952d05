"""
What this node does with the other nodes' notices (issue 15): it keeps its
view of the sessions they hold (L{RemoteSession}s) up to date, tells its
own sessions about theirs with the same presence and status events a
single broker sends, and acts on what concerns its own sessions — a
delivery to claim, a session replaced elsewhere, a disconnect or kick, a
ban, a hook report.

The kinds of notice (L{claudemesh.broker.cluster}; C{p} is a presence id,
C{u} a member id):

  - C{wake} C{{u: [...]}}: deliveries for these members may be queued;
  - C{sess} C{{p, e, x, c}}: a session opened or changed (its row is read),
    or closed (C{c}); C{e} is the event its node sent (C{peer_joined},
    C{peer_returned} with C{x}, C{peer_left}, C{peer_status}) or none;
  - C{gone} C{{p, u, n}}: a survivor closed a dead node C{n}'s session;
  - C{repl} C{{p, by}}: a hello elsewhere replaced session C{p};
  - C{end} C{{p: [...], c, r, e}}: end these sessions with close code C{c},
    reason C{r}, ending C{e} (a disconnect or kick elsewhere);
  - C{mesh}: the members changed (a join, role, ban, unban or departure);
  - C{hook} C{{u, p | sid, s}}: a hook report for a session held here, or
    to keep until its hello;
  - C{own} C{{p: [...], op, ...}}: a member's C{set_status}, C{set_summary},
    C{join_group} or C{leave_group} with C{sessionId}/C{all} for its
    sessions held here (L{claudemesh.broker.status.StatusBoard.noticed_own}).

Rows are read one at a time, in the order their notices came, so a
session's view never goes back to an older row.
"""

from twisted.internet import defer
from twisted.logger import Logger

from claudemesh.broker import pages
from claudemesh.broker.events import broadcast_system, peer_event_data
from claudemesh.broker.status import peer_row

# How many presence ids of sessions gone elsewhere each mesh remembers, so
# a row read late cannot bring one back.
GONE_KEPT = 10_000


class RemotePresence:
    """
    The other nodes' sessions, seen from this node.
    """

    _log = Logger()

    def __init__(self, meshes, store, cluster, presence, delivery, membership, hooks,
                 clock, settings):
        self._meshes = meshes
        self._store = store
        self._cluster = cluster
        self._presence = presence
        self._delivery = delivery
        self._membership = membership
        self._hooks = hooks
        self._clock = clock
        self._settings = settings
        self._reads = defer.DeferredLock()
        self._gone = {}
        for kind, handler in (("wake", self._wake), ("sess", self._session),
                              ("gone", self._dead), ("repl", self._replaced),
                              ("end", self._end), ("mesh", self._members),
                              ("hook", self._hook)):
            cluster.on(kind, self.for_cached_mesh(handler))
        cluster.on_rescan(self.rescan)

    def _now(self):
        return int(self._clock.seconds() * 1000)

    def for_cached_mesh(self, handler):
        # A mesh not in memory here has nobody here to tell: it is read
        # whole from the store when someone needs it.
        def handle(notice):
            mesh = self._meshes.cached(notice.mesh_id)
            if mesh is not None:
                handler(mesh, notice)
        return handle

    def _serial(self, function, *args):
        d = self._reads.run(function, *args)
        d.addErrback(lambda f: self._log.warn(
            "reading another node's change failed: {error}", error=f.getErrorMessage()[:200]))
        return d

    # -- deliveries -----------------------------------------------------------

    def _wake(self, mesh, notice):
        for member_id in notice.data.get("u", ()):
            self._delivery.wake_member(mesh, str(member_id))

    # -- sessions -------------------------------------------------------------

    def _session(self, mesh, notice):
        data = notice.data
        presence_id = str(data.get("p", ""))
        event = data.get("e")
        if data.get("c"):
            self._drop(mesh, presence_id, event == "peer_left")
            return
        self._serial(self._read_session, mesh, presence_id, event, data.get("x") or {})

    @defer.inlineCallbacks
    def _read_session(self, mesh, presence_id, event, extra):
        record = yield self._store.get_session(presence_id)
        if (record is None or record.disconnected_at is not None
                or record.node_id == self._cluster.node_id
                or presence_id in self._gone.get(mesh.id, ())):
            return
        remote = mesh.put_remote(record)
        if remote is None:
            # A member this node has not heard of yet.
            yield self._meshes.reload_members(mesh)
            remote = mesh.put_remote(record)
            if remote is None:
                return
        if event:
            self._announce(remote, event, extra)

    def _announce(self, remote, event, extra=None):
        now = self._now()
        if event == "peer_status":
            if remote.listed:
                row = peer_row(remote)
                budget = self._settings.max_message_bytes
                if budget and pages.size_of(row) > budget:
                    row = pages.shortened(row)
                broadcast_system(remote, "peer_status", row, now, watchers_only=True)
        elif event in ("peer_joined", "peer_returned", "peer_left") and remote.listed:
            data = peer_event_data(remote)
            if event == "peer_returned" and isinstance(extra, dict):
                data["lastSeenAt"] = extra.get("lastSeenAt")
                data["summary"] = extra.get("summary")
            if event == "peer_joined":
                remote.mesh.departed.pop((remote.member.id, remote.session_id), None)
            broadcast_system(remote, event, data, now)

    def _drop(self, mesh, presence_id, left):
        """
        Another node's session is gone; with C{left}, tell this node's
        sessions (C{peer_left}).
        """
        gone = self._gone.setdefault(mesh.id, {})
        gone[presence_id] = None
        if len(gone) > GONE_KEPT:
            gone.pop(next(iter(gone)))
        remote = mesh.remote.pop(presence_id, None)
        if remote is None:
            return None
        if left and remote.listed:
            mesh.departed[(remote.member.id, remote.session_id)] = (self._now(), remote.summary)
            self._announce(remote, "peer_left")
        return remote

    def _dead(self, mesh, notice):
        presence_id = str(notice.data.get("p", ""))
        if presence_id in mesh.sessions:
            # This node's own session (it had been taken for dead): its next
            # heartbeat records it again.
            return
        self._drop(mesh, presence_id, True)
        self._delivery.wake_member(mesh, str(notice.data.get("u", "")))

    def _replaced(self, mesh, notice):
        presence_id = str(notice.data.get("p", ""))
        session = mesh.sessions.get(presence_id)
        if session is None:
            self._drop(mesh, presence_id, False)
            return
        self._presence.replaced_elsewhere(session)

    def _end(self, mesh, notice):
        data = notice.data
        code, reason, ending = data.get("c"), data.get("r"), data.get("e")
        if not (isinstance(code, int) and isinstance(reason, str) and isinstance(ending, str)):
            return
        for presence_id in data.get("p", ()):
            session = mesh.sessions.get(presence_id)
            if session is not None:
                self._presence.end_connection(session, code, reason, ending)

    # -- members ----------------------------------------------------------------

    def _members(self, mesh, notice):
        self._serial(self._reload_members, mesh)

    @defer.inlineCallbacks
    def _reload_members(self, mesh):
        changed, removed = yield self._meshes.reload_members(mesh)
        for old, member in changed:
            if member.revoked_at is not None and (old is None or old.revoked_at is None):
                self._membership.end_banned(mesh, member)
        for member in removed:
            self._membership.end_departed(mesh, member)
            for remote in mesh.remote_of(member.id):
                mesh.remote.pop(remote.presence_id, None)

    # -- hooks ------------------------------------------------------------------

    def _hook(self, mesh, notice):
        self._hooks.noticed(mesh, notice)

    # -- missed notices -----------------------------------------------------------

    def rescan(self, reopen=False):
        """
        Notices may have been missed: read every mesh in memory again —
        members, and the sessions other nodes hold (telling this node's
        sessions who came and went meanwhile).
        """
        for mesh in self._meshes.meshes():
            self._serial(self._rescan_mesh, mesh)

    @defer.inlineCallbacks
    def _rescan_mesh(self, mesh):
        yield self._reload_members(mesh)
        appeared, gone = yield self._meshes.load_remote(mesh)
        for remote in gone:
            if remote.listed:
                self._announce(remote, "peer_left")
        for remote in appeared:
            self._announce(remote, "peer_joined")
        for member_id in {r.member.id for r in gone}:
            self._delivery.wake_member(mesh, member_id)

