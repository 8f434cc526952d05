"""
What the broker holds in memory: meshes, their members, and the sessions
(live or in grace) of each mesh — the state every part of the core reads.

A L{Session} is one hello's session. It is I{live} while it has a
connection (anything providing L{IPeerConnection}) and I{in grace} for a
while after an abnormal close. A L{MeshState} indexes its sessions by
presence id and by member; the L{MeshDirectory} loads meshes from the store
on first use and keeps them.

Nothing here sends or stores anything.
"""

import itertools

from twisted.internet import defer
from zope.interface import Attribute, Interface

from claudemesh.broker.status import StatusState
from claudemesh.store.records import SessionRecord


class IPeerConnection(Interface):
    """
    What the core needs of one client connection.
    """

    peer_address = Attribute("The client's address as a string, for logs and limits.")
    paused = Attribute(
        "True while the connection's outbound buffer is full: the outbox holds"
        " back claimed rows until it drained.")

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

    @ivar inflight: the leases this session's connection holds, message id ->
        (recipient key, lease end in ms), until C{client_ack}.
    @ivar outbox: the L{claudemesh.broker.outbox.Outbox} of the current
        connection (a new one for each connection).
    @ivar ending: set by the broker before it closes the connection itself,
        so the close that follows is not taken for a network drop.
    """

    # Sessions in the order this process made them: with connected_at, the
    # sort key of peers_list (and of its page cursors).
    _made = itertools.count(1)
    # Held by this node (a RemoteSession is another node's).
    remote = False

    def __init__(self, mesh, member, hello, presence_id, now, display_name, node_id=""):
        self.order = next(self._made)
        # The node holding the connection (issue 15).
        self.node_id = node_id
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
        # presence:false (a one-shot inbox): receives like any peer, but is
        # never shown (see listed).
        self.presence = hello.presence
        self.status = StatusState("idle", "jsonl", now)
        self.summary = None
        self.connected_at = now
        self.last_active_at = now
        self.connection = None
        self.grace_call = None
        self.inflight = {}
        self.outbox = None
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

    @property
    def listed(self) -> bool:
        """
        Is this session shown as a peer: presence events when it comes and
        goes, a row in others' C{peers_list}, a choice of disconnect/kick?
        An announced session, unless its hello said C{presence:false}.
        """
        return self.announced and self.presence

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
            node_id=self.node_id,
            watch=bool(self.watch),
            presence=bool(self.presence),
        )


class RemoteSession:
    """
    A session another node of the cluster holds (issue 15), as its row in
    the C{sessions} table says: what routing, C{peers_list}, presence
    events, moderation and the hook need to know of it. It has no
    connection here; what is done to it is a notice to its node. It counts
    as live while its row is open (in grace on its node, too).
    """

    live = True
    remote = True
    connection = None
    outbox = None
    grace_call = None
    ending = None

    def __init__(self, mesh, member, record):
        self.order = next(Session._made)
        self.mesh = mesh
        self.member = member
        self.update(record)

    def update(self, record):
        self.record = record
        self.presence_id = record.presence_id
        self.node_id = record.node_id
        self.session_id = record.session_id
        self.session_pubkey = record.session_pubkey
        self.claude_session_id = record.claude_session_id
        self.display_name = record.display_name
        self.pid = record.pid
        self.cwd = record.cwd
        self.hostname = record.hostname
        self.peer_type = record.peer_type
        self.channel = record.channel
        self.model = record.model
        self.groups = {name: None for name in record.groups}
        self.receive = record.receive
        self.watch = record.watch
        self.presence = record.presence
        self.status = StatusState(record.status, record.status_source, record.status_updated_at)
        self.summary = record.summary
        self.connected_at = record.connected_at
        self.last_active_at = record.last_active_at

    pubkey = Session.pubkey
    announced = Session.announced
    listed = Session.listed


class MeshState:
    """
    What the broker holds in memory for one mesh: its record, its members and
    its sessions (live or in grace) — this node's, and other nodes'
    (L{RemoteSession}s, in C{remote}).
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
        # presence id -> RemoteSession: the sessions other nodes hold.
        self.remote = {}

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
        for session in self.sessions_of(member.id) + self.remote_of(member.id):
            session.member = member

    def drop_member(self, member):
        self.members.pop(member.id, None)
        self.members_by_pubkey.pop(member.pubkey, None)

    def live_count(self):
        """
        The connections of the mesh, on every node (another node's session
        in grace counts too: its row does not say).
        """
        return sum(1 for s in self.sessions.values() if s.live) + len(self.remote)

    def everyone(self):
        """
        Every session of the mesh, this node's and other nodes'.
        """
        return list(self.sessions.values()) + list(self.remote.values())

    def remote_of(self, member_id):
        return [s for s in self.remote.values() if s.member.id == member_id]

    def put_remote(self, record):
        """
        Keep (or refresh) another node's session; C{None} when its member
        is not known here.
        """
        member = self.members.get(record.member_id)
        if member is None:
            return None
        remote = self.remote.get(record.presence_id)
        if remote is None:
            remote = self.remote[record.presence_id] = RemoteSession(self, member, record)
        else:
            remote.member = member
            remote.update(record)
        if remote.session_pubkey:
            self.session_keys[remote.session_pubkey] = member.id
        return remote

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


class MeshDirectory:
    """
    The meshes this broker has in memory, loaded from the store on first use.
    """

    def __init__(self, store):
        self._store = store
        self._meshes = {}
        self._loading = {}
        # This node's id when other nodes may share the store (issue 15): a
        # mesh then loads with the sessions the others hold.
        self.node_id = None

    def load(self, mesh_id):
        """
        The L{MeshState} of a mesh, loaded from the store on first use; fires
        with C{None} for an unknown mesh. Concurrent loads of one mesh share
        one read.
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
        # read() returns.
        self._loading[mesh_id] = [d]

        @defer.inlineCallbacks
        def read():
            record = yield self._store.get_mesh(mesh_id)
            if record is None:
                return None
            members = yield self._store.list_members(mesh_id)
            mesh = MeshState(record, members)
            if self.node_id is not None:
                yield self.load_remote(mesh)
            return mesh

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

        read().addCallbacks(loaded, failed)
        return d

    @defer.inlineCallbacks
    def load_remote(self, mesh):
        """
        Read the sessions other nodes hold in C{mesh} from the store, in
        place of those known: fires with C{(appeared, gone)}, the
        L{RemoteSession}s new here and those no longer open.
        """
        records = yield self._store.list_open_sessions(mesh.id)
        before, mesh.remote = mesh.remote, {}
        appeared = []
        for record in records:
            if record.node_id == self.node_id:
                continue
            known = before.pop(record.presence_id, None)
            if known is not None:
                mesh.remote[record.presence_id] = known
            remote = mesh.put_remote(record)
            if remote is not None and known is None:
                appeared.append(remote)
        return appeared, list(before.values())

    @defer.inlineCallbacks
    def reload_members(self, mesh):
        """
        Read the members of C{mesh} again (another node changed them): fires
        with C{(changed, removed)}, the L{MemberRecord}s that differ from
        what was known and those no longer members.
        """
        members = yield self._store.list_members(mesh.id)
        known = dict(mesh.members)
        changed = []
        for member in members:
            old = known.pop(member.id, None)
            if old != member:
                mesh.put_member(member)
                changed.append((old, member))
        for member in known.values():
            mesh.drop_member(member)
        return changed, list(known.values())

    def cached(self, mesh_id):
        """
        The L{MeshState} of a mesh already in memory, or C{None}.
        """
        return self._meshes.get(mesh_id)

    def meshes(self):
        return list(self._meshes.values())

    def sessions(self):
        """
        Every session of every mesh in memory (a copy: callers may end them).
        """
        return [s for mesh in self._meshes.values() for s in list(mesh.sessions.values())]
