-- claudemesh store schema, version 4 (v3 + the mesh key epochs of upgrade-to-v4.sql).
-- One file for both backends: only types and syntax that SQLite and Postgres
-- share. Every time is an integer of milliseconds since the epoch (the audit
-- chain hashes ISO strings with milliseconds, so finer columns would break it).

CREATE TABLE schema_version (
    version INTEGER NOT NULL
);

CREATE TABLE meshes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    owner_pubkey TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE members (
    id TEXT PRIMARY KEY,
    mesh_id TEXT NOT NULL REFERENCES meshes (id) ON DELETE CASCADE,
    pubkey TEXT NOT NULL,
    display_name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    -- The invite this key joined with: a ban revokes it too (a ban is per key).
    invite_id TEXT,
    joined_at BIGINT NOT NULL,
    revoked_at BIGINT,
    UNIQUE (mesh_id, pubkey)
);

CREATE TABLE invites (
    id TEXT PRIMARY KEY,
    mesh_id TEXT NOT NULL REFERENCES meshes (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    max_uses INTEGER NOT NULL,
    used_count INTEGER NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- One row per WebSocket session (a hello), mirrored from the broker core.
CREATE TABLE sessions (
    presence_id TEXT PRIMARY KEY,
    mesh_id TEXT NOT NULL REFERENCES meshes (id) ON DELETE CASCADE,
    member_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    session_pubkey TEXT,
    claude_session_id TEXT,
    display_name TEXT NOT NULL,
    pid INTEGER NOT NULL,
    cwd TEXT NOT NULL,
    hostname TEXT,
    peer_type TEXT,
    channel TEXT,
    model TEXT,
    groups TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL CHECK (status IN ('idle', 'working', 'dnd')),
    status_source TEXT NOT NULL CHECK (status_source IN ('hook', 'manual', 'jsonl')),
    status_updated_at BIGINT NOT NULL,
    summary TEXT,
    receive INTEGER NOT NULL,
    connected_at BIGINT NOT NULL,
    last_active_at BIGINT NOT NULL,
    disconnected_at BIGINT
);
CREATE INDEX sessions_open ON sessions (mesh_id, disconnected_at);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    mesh_id TEXT NOT NULL REFERENCES meshes (id) ON DELETE CASCADE,
    sender_member_id TEXT NOT NULL,
    -- The key the sender encrypted with: its session key, else its member key.
    sender_pubkey TEXT NOT NULL,
    sender_member_pubkey TEXT NOT NULL,
    target_spec TEXT NOT NULL,
    priority TEXT NOT NULL CHECK (priority IN ('now', 'next', 'low')),
    nonce TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    -- The mesh key epoch of a broadcast or group message (0 for a DM).
    key_epoch BIGINT NOT NULL DEFAULT 0,
    seq BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX messages_created ON messages (created_at);

-- One row per recipient of a message. recipient_key is the member id for a
-- member delivery and the session public key for a session delivery.
CREATE TABLE deliveries (
    message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient_key TEXT NOT NULL,
    recipient_kind TEXT NOT NULL CHECK (recipient_kind IN ('member', 'session')),
    mesh_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    -- For @group sends: only a session that joined this group may take the lease.
    group_name TEXT,
    priority TEXT NOT NULL CHECK (priority IN ('now', 'next', 'low')),
    seq BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'delivered', 'expired')),
    lease_session TEXT,
    lease_until BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    acked_at BIGINT,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (message_id, recipient_key)
);
CREATE INDEX deliveries_member_pending ON deliveries (member_id, state, seq);
CREATE INDEX deliveries_recipient_pending ON deliveries (recipient_key, state, seq);
CREATE INDEX deliveries_expires ON deliveries (expires_at);
CREATE INDEX deliveries_lease ON deliveries (lease_session);

-- Idempotent send: (sender member, client id) -> the message it created.
CREATE TABLE send_keys (
    sender_member_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (sender_member_id, client_id)
);

-- Metadata-only audit log, a sha256 chain per mesh (claudemesh.audit).
CREATE TABLE audit_log (
    mesh_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    actor TEXT,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (mesh_id, seq)
);
CREATE INDEX audit_log_key_events ON audit_log (mesh_id, seq)
    WHERE event_type IN ('member_banned', 'member_left', 'mesh_key_rotated');

-- Which (mesh, member) a session key belongs to: bound by the first hello
-- that proved the key, for good. Another member presenting the same key is
-- refused (bad_session_pubkey), on this node and on any other.
CREATE TABLE session_keys (
    session_pubkey TEXT PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    bound_at BIGINT NOT NULL
);
CREATE INDEX session_keys_member ON session_keys (member_id);

-- Mesh key epochs: one row per rotation, and each member's copy of that
-- epoch's key sealed to its own member key (opaque to the broker). Epoch 0,
-- the invite link's key, has no row.
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
