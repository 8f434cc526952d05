-- Schema version 5 -> 6: the signatures the nodes of a cluster accepted
-- (issue 15).
--
-- A signed hello, hook request, mesh creation or join is good once within
-- its 60 s window (issue 11). One broker remembers them in memory; brokers
-- sharing the database remember them here too, so a credential used at one
-- node is refused at every other. A row is dead once expires_at passes; the
-- heartbeat sweep deletes dead rows, and a use after expiry takes the row
-- over.

CREATE TABLE used_signatures (
    kind TEXT NOT NULL,
    signer TEXT NOT NULL,
    signature TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (kind, signer, signature)
);
CREATE INDEX used_signatures_expiry ON used_signatures (expires_at);

-- A hello looks for its session open on another node.
CREATE INDEX sessions_member_open ON sessions (member_id, session_id)
    WHERE disconnected_at IS NULL;
