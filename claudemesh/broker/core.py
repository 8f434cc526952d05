"""
The broker core: its parts, how they are wired, and the service that runs
their timers.

No sockets and no SQL in any part: a session's connection is anything
providing L{IPeerConnection} (the WebSocket protocol in production, a list
in tests); durable state goes through an L{IStore}, every write and every
claim in order through one L{GroupCommit}; time comes from the injected
clock. The parts, each in its own module, and who they call:

  - L{MeshDirectory} (sessions): meshes, members and sessions in memory;
  - L{Delivery} (delivery, outbox): routing, leases, pushes, acks;
  - L{StatusBoard} (status): status, summary, groups -> Delivery;
  - L{HookStatus} (hook): the signed status hook -> StatusBoard;
  - L{Presence} (presence): hello, grace, departure -> Delivery, HookStatus;
  - L{Membership} (membership): meshes, invites, joins, roles, moderation
    -> Presence;
  - L{AuditLog} (auditlog): reading and verifying the audit chain;
  - L{MeshKeys} (meshkeys): mesh key epochs and their rotation (issue 17);
    Delivery asks it about stale epochs, Presence for the hello_ack's epoch;
  - L{Cluster} (cluster): this node among the others on one database, its
    heartbeat and notices; L{RemotePresence} (remote) acts on the others'
    notices (issue 15). The parts queue notices through C{notify}.

docs/design.md draws the whole house.
"""

from twisted.application import service
from twisted.logger import Logger

from claudemesh.broker.auditlog import AuditLog
from claudemesh.broker.cluster import Cluster, LocalBackplane
from claudemesh.broker.delivery import Delivery
from claudemesh.broker.groupcommit import GroupCommit
from claudemesh.broker.hook import HookStatus
from claudemesh.broker.membership import Membership
from claudemesh.broker.meshkeys import MeshKeys
from claudemesh.broker.presence import Presence
from claudemesh.broker.remote import RemotePresence
from claudemesh.broker.replay import LocalReplayMemory, SharedReplayMemory
from claudemesh.broker.sessions import IPeerConnection, MeshDirectory
from claudemesh.broker.status import StatusBoard

__all__ = ["Broker", "IPeerConnection"]

# How often the clock-driven sweeps run: status decay, lease expiry, pending
# hook signals, rate-limit buckets. Short enough that a 30 s lease or a 60 s
# TTL is honoured within a few seconds.
SWEEP_INTERVAL = 5.0


class Broker(service.Service):
    """
    The broker core: builds its parts and runs their sweeps while the
    service runs; stopping it closes every session (1001) and flushes what
    is still to be written.
    """

    _log = Logger()

    def __init__(self, store, clock, settings, metrics=None, replays=None, backplane=None,
                 node_name="broker", hostname=""):
        """
        @param replays: the L{IReplayMemory} of the signed credentials
            accepted; one in this process's memory when C{None}.
        @param backplane: the L{IBackplane} this node shares the store with
            other nodes through (issue 15); alone (a L{LocalBackplane})
            when C{None}.
        @param node_name: this node's name in the C{nodes} table.
        """
        self.store = store
        shared = backplane is not None and not backplane.single_process
        if replays is None:
            # Brokers sharing a database share what they accepted (issue 15).
            replays = SharedReplayMemory(clock, store) if shared else LocalReplayMemory(clock)
        self.replays = replays
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.writes = GroupCommit(store, clock, metrics)
        self.cluster = Cluster(store, self.writes, clock,
                               backplane if backplane is not None else LocalBackplane(),
                               node_name, hostname, metrics)
        self.meshes = MeshDirectory(store)
        notify = self.cluster.notice
        if self.cluster.clustered:
            # Meshes load with the sessions other nodes hold.
            self.meshes.node_id = self.cluster.node_id
        self.mesh_keys = MeshKeys(store, self.writes, clock, self.meshes, self.cluster)
        self.delivery = Delivery(self.meshes, self.writes, store, clock, settings, metrics,
                                 key_epochs=self.mesh_keys.refuse_send, notify=notify)
        self.status = StatusBoard(self.meshes, self.writes, self.delivery, clock, settings,
                                  notify=notify)
        self.hooks = HookStatus(self.meshes, self.status, clock, settings, self.replays,
                                notify=notify)
        self.presence = Presence(self.meshes, self.writes, store, self.delivery, self.hooks,
                                 clock, settings, self.replays, metrics,
                                 hello_fields=self.mesh_keys.hello_fields,
                                 node_id=self.cluster.node_id, notify=notify)
        self.membership = Membership(self.meshes, store, self.writes, self.presence, clock,
                                     settings, self.replays, notify=notify)
        self.remote = RemotePresence(self.meshes, store, self.cluster, self.presence,
                                     self.delivery, self.membership, self.hooks, clock, settings)
        self.cluster.on("own", self.remote.for_cached_mesh(self.status.noticed_own))
        self.audit = AuditLog(store, self.writes, settings)
        self._sweeper = None
        self.cluster.on_rescan(self._rescan)

    def _rescan(self, reopen):
        """
        Notices may have been missed (L{Cluster.rescan}): every outbox claims
        again; with C{reopen}, this node had been taken for dead, so its
        sessions are recorded as open again.
        """
        for session in self.meshes.sessions():
            if reopen:
                self.writes.open_session(session.record())
            self.delivery.wake(session)

    def handlers(self):
        """
        The request each frame type accepted after a hello is answered by:
        frame type -> a bound method C{(session, frame)} returning the reply
        (a dict, a L{Deferred} of one, or C{None}).
        """
        delivery, status, membership = self.delivery, self.status, self.membership
        return {
            "send": delivery.send,
            "client_ack": delivery.client_ack,
            "message_status": delivery.message_status,
            "set_status": status.set_status,
            "set_summary": status.set_summary,
            "join_group": status.join_group,
            "leave_group": status.leave_group,
            "list_peers": self.presence.list_peers,
            "audit_query": self.audit.audit_query,
            "audit_verify": self.audit.audit_verify,
            "create_invite": membership.create_invite,
            "list_invites": membership.list_invites,
            "revoke_invite": membership.revoke_invite,
            "set_role": membership.set_role,
            "leave": membership.leave,
            "list_members": membership.list_members,
            "disconnect": membership.disconnect,
            "kick": membership.kick,
            "ban": membership.ban,
            "unban": membership.unban,
            "list_bans": membership.list_bans,
            "rotate_mesh_key": self.mesh_keys.rotate,
            "share_mesh_key": self.mesh_keys.share,
            "get_mesh_key": self.mesh_keys.get,
            "mesh_key_status": self.mesh_keys.status,
        }

    # -- service -------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self._schedule_sweep()

    def stopService(self):
        """
        Graceful shutdown (L{Presence.shut_down}): nothing acknowledged is
        lost.
        """
        service.Service.stopService(self)
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        d = self.presence.shut_down()
        d.addCallback(lambda _: self.cluster.stop())
        return d

    def store_opened(self):
        """
        The store is open: this node joins the cluster, closing what
        previous processes left open (L{Cluster.start}: everything when
        alone; its own previous process's and dead nodes' otherwise).
        """
        d = self.cluster.start()
        d.addErrback(lambda f: self._log.failure("joining the cluster failed", f))
        return d

    def _schedule_sweep(self):
        self._sweeper = self.clock.callLater(SWEEP_INTERVAL, self._sweep_step)

    def _sweep_step(self):
        # Each part guards itself: one failure must not stop the others or
        # the next sweep.
        for part in (self.status.sweep, self.delivery.sweep_leases, self.hooks.sweep,
                     self.mesh_keys.sweep):
            try:
                part()
            except Exception:
                self._log.failure("broker sweep step {part} failed", part=part.__qualname__)
        if self.running:
            self._schedule_sweep()
