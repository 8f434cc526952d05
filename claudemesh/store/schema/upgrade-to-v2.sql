-- Schema version 1 -> 2: delivery indexes for the hot path.
--
-- An index led by `state` made SQLite answer acknowledgements and lease
-- releases by walking every pending delivery (it prefers it to the primary
-- key for `state IN (...)`), so their cost grew with the queue. Expiry only
-- needs `expires_at`; releases look deliveries up by their lease holder.

DROP INDEX deliveries_expiry;
CREATE INDEX deliveries_expires ON deliveries (expires_at);
CREATE INDEX deliveries_lease ON deliveries (lease_session);
