-- Schema version 3 -> 4: mesh key epochs (issue 17).
--
-- Broadcasts and group messages record the mesh key epoch they were sealed
-- under (0, the invite link's key, for everything stored before). Each
-- rotation is one row of mesh_key_epochs; each member's copy of that
-- epoch's key, sealed to its own key by the rotating client, one row of
-- mesh_key_copies: opaque to the broker, which never holds a mesh key.
-- A partial audit index finds the last rotation and the departures since
-- it without reading a mesh's whole chain; it holds those events only, so
-- the message_sent rows of every send cost nothing more.

ALTER TABLE messages ADD COLUMN key_epoch BIGINT NOT NULL DEFAULT 0;

CREATE TABLE mesh_key_epochs (
    mesh_id TEXT NOT NULL REFERENCES meshes (id) ON DELETE CASCADE,
    epoch BIGINT NOT NULL,
    rotated_by TEXT NOT NULL,
    sealed_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (mesh_id, epoch)
);

CREATE TABLE mesh_key_copies (
    mesh_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    member_id TEXT NOT NULL,
    sealed_key TEXT NOT NULL,
    sealed_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (mesh_id, epoch, member_id),
    FOREIGN KEY (mesh_id, epoch) REFERENCES mesh_key_epochs (mesh_id, epoch) ON DELETE CASCADE
);

CREATE INDEX audit_log_key_events ON audit_log (mesh_id, seq)
    WHERE event_type IN ('member_banned', 'member_left', 'mesh_key_rotated');
