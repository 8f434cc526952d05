-- Schema version 4 -> 5: several broker processes on one database (issue 15).
--
-- Each broker process is a node: one row of nodes, its heartbeat refreshed
-- every few seconds while it runs. A node whose heartbeat is older than the
-- timeout is dead: the nodes that survive close its sessions and give its
-- leases back (stopped_at set, in the same transaction).
--
-- Each session row says which node holds its connection, and whether it is
-- a watching session (the local UI) or one shown as a peer (presence), so
-- the other nodes route to it and list it as its own node would.

CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    stopped_at BIGINT
);
CREATE INDEX nodes_running ON nodes (heartbeat_at) WHERE stopped_at IS NULL;

ALTER TABLE sessions ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN watch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN presence INTEGER NOT NULL DEFAULT 1;
CREATE INDEX sessions_node_open ON sessions (node_id) WHERE disconnected_at IS NULL;
