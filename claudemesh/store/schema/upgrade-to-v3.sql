-- Schema version 2 -> 3: session keys are bound to one (mesh, member).
--
-- A session key was known only in the broker's memory, per mesh, and the
-- last hello to present one took it over (issue 11, item 1). The first
-- hello that proves a key now binds it here; the primary key makes that
-- binding atomic across connections and broker nodes.

CREATE TABLE session_keys (
    session_pubkey TEXT PRIMARY KEY,
    mesh_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    bound_at BIGINT NOT NULL
);
CREATE INDEX session_keys_member ON session_keys (member_id);
