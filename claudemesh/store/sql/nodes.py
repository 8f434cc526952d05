"""
The nodes of a cluster (issue 15): one row per broker process, its
heartbeat, and what the nodes that survive do for one that died — close its
sessions and give its leases back, in one transaction, by one node at a
time (an advisory lock on Postgres); and the signed credentials the nodes
accepted, so one used at one node is refused at every other.

A node is dead when its heartbeat is older than the timeout, or when a
newer process of the same name started (a restart releases its own
previous sessions at once rather than after the timeout). Sessions left
open by a node that is not running any more — or by a broker from before
schema version 5, which had no node — are closed the same way.
"""

import attr

from claudemesh.store.records import NodeRecord, ReapedSession
from claudemesh.store.sql.operations import Execute, InsertRows, Query
from claudemesh.store.sql.sessions import close_sessions_txn

NODE_COLUMNS = tuple(f.name for f in attr.fields(NodeRecord))


def register_node_txn(node):
    yield InsertRows("nodes", NODE_COLUMNS, [attr.astuple(node)])


def heartbeat_txn(node_id, now):
    """
    Refresh the heartbeat; C{False} when the node had been declared dead
    meanwhile (it is running again from now on, and must say so again
    about its sessions).
    """
    updated = yield Execute(
        "UPDATE nodes SET heartbeat_at = %s WHERE id = %s AND stopped_at IS NULL",
        (now, node_id),
    )
    if updated:
        return True
    yield Execute(
        "UPDATE nodes SET heartbeat_at = %s, stopped_at = NULL WHERE id = %s", (now, node_id))
    return False


def stop_node_txn(node_id, now):
    yield Execute(
        "UPDATE nodes SET stopped_at = %s WHERE id = %s AND stopped_at IS NULL", (now, node_id))


def _close_txn(rows, now):
    reaped = [ReapedSession(node_id, mesh_id, presence_id, member_id)
              for presence_id, mesh_id, member_id, node_id in rows]
    if reaped:
        yield from close_sessions_txn([r.presence_id for r in reaped], now)
    return reaped


def reap_txn(dialect, own_id, own_name, cutoff, now):
    """
    Close the sessions of every node but C{own_id} that is not running —
    its heartbeat older than C{cutoff}, stopped, unknown, or an older
    process named C{own_name} — and mark those nodes stopped.

    @return: the L{ReapedSession}s; C{[]} as well when another node is
        reaping right now (it does the work).
    """
    locked = yield from dialect.try_lock("reap")
    if not locked:
        return []
    yield Execute(
        "UPDATE nodes SET stopped_at = %s WHERE stopped_at IS NULL AND id <> %s"
        " AND (heartbeat_at < %s OR name = %s)",
        (now, own_id, cutoff, own_name),
    )
    rows = yield Query(
        "SELECT presence_id, mesh_id, member_id, node_id FROM sessions"
        " WHERE disconnected_at IS NULL AND node_id <> %s AND node_id NOT IN"
        " (SELECT id FROM nodes WHERE stopped_at IS NULL)"
        " ORDER BY presence_id",
        (own_id,),
    )
    return (yield from _close_txn(rows, now))


def use_signature_txn(kind, signer, signature, expires_at, now):
    """
    Record one use of a signed credential; C{True} for its first use (or
    the first since its last record expired).
    """
    # One row changed: inserted, or an expired one taken over. None: it is
    # still remembered (a concurrent use waits for the first one's commit,
    # then finds its row).
    changed = yield Execute(
        "INSERT INTO used_signatures (kind, signer, signature, expires_at)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (kind, signer, signature) DO UPDATE"
        " SET expires_at = excluded.expires_at WHERE used_signatures.expires_at <= %s",
        (kind, signer, signature, expires_at, now),
    )
    return changed == 1


def forget_signatures_txn(now):
    return (yield Execute("DELETE FROM used_signatures WHERE expires_at <= %s", (now,)))


def running_nodes_txn(cutoff):
    rows = yield Query(
        "SELECT %s FROM nodes WHERE stopped_at IS NULL AND heartbeat_at >= %%s"
        " ORDER BY started_at, id" % (", ".join(NODE_COLUMNS),),
        (cutoff,),
    )
    return [NodeRecord(*row) for row in rows]


class NodeStore:
    """
    The nodes half of L{claudemesh.store.sql.SQLStore}.
    """

    def register_node(self, node):
        return self.run_interaction("register_node", register_node_txn, node)

    def heartbeat_node(self, node_id, now):
        return self.run_interaction("heartbeat_node", heartbeat_txn, node_id, now)

    def stop_node(self, node_id, now):
        return self.run_interaction("stop_node", stop_node_txn, node_id, now)

    def reap_nodes(self, own_id, own_name, cutoff, now):
        return self.run_interaction(
            "reap_nodes", reap_txn, self.dialect, own_id, own_name, cutoff, now)

    def use_signature(self, kind, signer, signature, expires_at, now):
        return self.run_interaction(
            "use_signature", use_signature_txn, kind, signer, signature, expires_at, now)

    def forget_signatures(self, now):
        return self.run_interaction("forget_signatures", forget_signatures_txn, now)

    def running_nodes(self, cutoff):
        return self.run_interaction("running_nodes", running_nodes_txn, cutoff, write=False)
