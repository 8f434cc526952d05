"""
The cluster: several broker processes (nodes) on one database (issue 15).

The tables are the truth; what the nodes add is a wake-up and a heartbeat:

  - each node has an id, new at every start, and a name (C{--node-name},
    by default the host and the listening port) in the C{nodes} table,
    whose heartbeat it refreshes every L{HEARTBEAT_SECONDS};
  - a change another node must act on (a delivery queued for a member
    whose session is there, a session come or gone, a moderation action) is
    a L{Notice} sent by the transaction that stores the change, through the
    L{IBackplane} (Postgres: C{NOTIFY}, so it arrives only if the change
    committed). A notice is a hint: a node that may have missed some (its
    listening connection dropped) re-reads the tables (L{Cluster.rescan});
  - a node whose heartbeat is older than L{NODE_TIMEOUT_SECONDS} is dead:
    the first survivor to notice (an advisory lock makes it one at a time)
    closes its sessions and gives its leases back; the notices it sends make
    every node tell its peers that those sessions left and offer their
    deliveries again. A node restarting under the same name does the same
    for its previous process at once.

SQLite is the single-process store: its backplane (L{LocalBackplane}) has
nobody to tell, and at start the node closes every session still open.
Several in-process nodes on one L{LocalHub} are how the unit tests run a
cluster on a L{task.Clock}.

The parts of the core register what they do with each kind of notice
(L{Cluster.on}); the notices themselves are queued in the L{GroupCommit}
with the writes they are about.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from claudemesh.broker.ids import new_id
from claudemesh.store.records import NodeRecord, Notice

# How often a node refreshes its heartbeat and looks for dead nodes.
HEARTBEAT_SECONDS = 5.0
# A node silent for this long is dead (the issue: within 30 s).
NODE_TIMEOUT_SECONDS = 20.0


class IBackplane(Interface):
    """
    How the nodes of a cluster wake each other up.
    """

    single_process = Attribute(
        "True when no other process can share the store (SQLite): the node is"
        " alone, and at start every open session is a previous run's.")

    def start(receive, rescan):
        """
        Start listening: C{receive(notice)} for each L{Notice} of another
        node; C{rescan()} whenever notices may have been missed (the
        listening connection came back).
        """

    def committed(notices):
        """
        These L{Notice}s were stored with their batch (a backplane whose
        store sends them in the transaction has nothing left to do).
        """

    def stop():
        """
        Stop listening.
        """


@implementer(IBackplane)
class LocalBackplane:
    """
    The backplane of nodes in one process: alone (the SQLite store), or on a
    shared L{LocalHub} (tests).
    """

    def __init__(self, hub=None):
        self._hub = hub
        self._receive = None
        self.single_process = hub is None

    def start(self, receive, rescan):
        self._receive = receive
        if self._hub is not None:
            self._hub.join(self)

    def committed(self, notices):
        if self._hub is not None and notices:
            self._hub.publish(self, list(notices))

    def stop(self):
        if self._hub is not None:
            self._hub.leave(self)
        self._receive = None

    def deliver(self, notice):
        if self._receive is not None:
            self._receive(notice)


class LocalHub:
    """
    Several in-process nodes' backplanes: a committed notice reaches every
    other one on the next turn of C{clock}, as a notification would.
    """

    def __init__(self, clock):
        self._clock = clock
        self._members = []
        self.dropping = False

    def backplane(self):
        return LocalBackplane(self)

    def join(self, backplane):
        self._members.append(backplane)

    def leave(self, backplane):
        if backplane in self._members:
            self._members.remove(backplane)

    def publish(self, sender, notices):
        if self.dropping:
            # A test's lost notification: the tables still hold the truth.
            return
        for other in list(self._members):
            if other is not sender:
                for notice in notices:
                    self._clock.callLater(0, other.deliver, notice)


class Cluster:
    """
    This node: its record, its heartbeat, the dead nodes it reaps, and the
    notices it sends and receives.

    @param writes: the L{GroupCommit} notices are queued in.
    @param name: the node name (C{--node-name}; by default the host and
        the listening endpoint, so a restart recognises its previous
        process).
    @param hostname: this machine's name, for the C{nodes} table.
    """

    _log = Logger()

    def __init__(self, store, writes, clock, backplane, name, hostname="", metrics=None):
        self._store = store
        self._writes = writes
        self._clock = clock
        self.backplane = backplane
        self.node_id = new_id()
        self.name = name
        self._hostname = hostname
        self._metrics = metrics
        self._handlers = {}
        self._rescans = []
        self._heartbeat = None
        self._started = False
        writes.on_committed = backplane.committed

    @property
    def clustered(self):
        """
        May other nodes share the store (so remote sessions exist)?
        """
        return not self.backplane.single_process

    def _now(self):
        return int(self._clock.seconds() * 1000)

    def on(self, kind, handler):
        """
        Call C{handler(notice)} for each notice of C{kind} from another node.
        """
        self._handlers[kind] = handler

    def on_rescan(self, handler):
        """
        Call C{handler()} when notices may have been missed.
        """
        self._rescans.append(handler)

    def notice(self, kind, mesh_id, **data):
        """
        Queue a notice for the other nodes, sent with the next batch.
        """
        if self.clustered and not (kind == "wake" and not data.get("u")):
            self._writes.notice(Notice(self.node_id, kind, mesh_id, data))

    # -- start and stop --------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """
        The store is open: record this node, and close what earlier
        processes left open (all of it when alone; otherwise this node's
        previous process's and dead nodes').
        """
        now = self._now()
        if self.backplane.single_process:
            closed = yield self._store.close_all_sessions(now)
            if closed:
                self._log.info("closed {count} sessions left open by a previous run",
                               count=closed)
        yield self._store.register_node(NodeRecord(
            self.node_id, self.name, self._hostname, os.getpid(), now, now))
        self.backplane.start(self._received, self.rescan)
        self._started = True
        if self.clustered:
            self._log.info("node {name} ({node}) joined the cluster", name=self.name,
                           node=self.node_id)
            yield self.reap()
        self._schedule()

    def stop(self):
        """
        Stop the heartbeat and say this node stopped (its sessions were
        closed by the shutdown).
        """
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        if not self._started:
            return defer.succeed(None)
        self._started = False
        self.backplane.stop()
        d = self._store.stop_node(self.node_id, self._now())
        d.addErrback(lambda f: self._log.warn("could not record this node's stop: {error}",
                                              error=f.getErrorMessage()[:200]))
        return d

    def _schedule(self):
        self._heartbeat = self._clock.callLater(HEARTBEAT_SECONDS, self._beat)

    def _beat(self):
        self._heartbeat = None
        d = self.beat()
        d.addErrback(lambda f: self._log.warn("heartbeat failed: {error}",
                                              error=f.getErrorMessage()[:200]))
        d.addBoth(lambda _: self._schedule() if self._started else None)

    @defer.inlineCallbacks
    def beat(self):
        """
        One heartbeat, and one look for dead nodes.
        """
        alive = yield self._store.heartbeat_node(self.node_id, self._now())
        if not alive:
            # Found dead (the database was out of reach, or this process
            # stalled, for longer than the timeout): the survivors closed
            # this node's sessions. Say again that they are here.
            self._log.warn("this node had been taken for dead; its sessions are "
                           "recorded again")
            self.rescan(reopen=True)
        if self.clustered:
            yield self.reap()

    @defer.inlineCallbacks
    def reap(self):
        """
        Close what dead nodes left open, and tell every node.
        """
        now = self._now()
        cutoff = now - int(NODE_TIMEOUT_SECONDS * 1000)
        reaped = yield self._store.reap_nodes(self.node_id, self.name, cutoff, now)
        # Signatures past their window are dead rows: whoever reaps sweeps.
        yield self._store.forget_signatures(now)
        if not reaped:
            return reaped
        nodes = sorted({r.node_id for r in reaped})
        self._log.warn(
            "closed {count} sessions of {nodes} node(s) no longer running ({ids}); "
            "their leases are back in the queue",
            count=len(reaped), nodes=len(nodes), ids=", ".join(n or "(none)" for n in nodes))
        notices = [Notice(self.node_id, "gone", r.mesh_id,
                          {"p": r.presence_id, "u": r.member_id, "n": r.node_id})
                   for r in reaped]
        # The sessions are closed already: these notices only tell.
        if self.clustered:
            yield self._store.notify(notices)
            self.backplane.committed(notices)
        for notice in notices:
            self._dispatch(notice)
        return reaped

    # -- notices ---------------------------------------------------------------

    def _received(self, notice):
        if notice.origin == self.node_id:
            # Postgres hands a listener its own notifications too.
            return
        self._dispatch(notice)

    def _dispatch(self, notice):
        handler = self._handlers.get(notice.kind)
        if handler is None:
            return
        try:
            handler(notice)
        except Exception:
            self._log.failure("handling a {kind} notice failed", kind=notice.kind)

    def rescan(self, reopen=False):
        """
        Notices may have been missed: each part re-reads what it keeps of
        other nodes, and every outbox claims again.
        """
        for handler in self._rescans:
            try:
                handler(reopen)
            except Exception:
                self._log.failure("re-scanning after missed notices failed")
