"""
Seeding a broker's database for the growth scenario: a mesh of history the
measured peers never see — C{delivered} messages already confirmed, and
C{queued} ones waiting for a member that stays offline — written straight
into the store's tables, in the database's own engine (a recursive CTE on
SQLite, C{generate_series} on Postgres), so a million rows take seconds
rather than the minutes the broker itself would need.

The runner creates the schema first by starting and stopping the broker on
the database, so the rows match whatever schema version the broker is at.
Per seeded message: the message row, one member delivery and its send key
(an idempotency key still within its expiry), as the broker writes them.
Not seeded: audit-chain links (the seed mesh's chain would not verify, and
the chain is per mesh: the measured mesh's tail lookup does not see it).
"""

import time

SEED_MESH = "bench-seed-mesh"
SEED_SENDER = "bench-seed-sender"
SEED_RECIPIENT = "bench-seed-offline"
# A crypto_box of 128 bytes of plaintext, base64: what the bench's DMs carry.
CIPHERTEXT = "Q" * 192
NONCE = "N" * 32
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS

_MESSAGE_COLUMNS = ("id, mesh_id, sender_member_id, sender_pubkey, sender_member_pubkey,"
                    " target_spec, priority, nonce, ciphertext, seq, created_at, expires_at")
_DELIVERY_COLUMNS = ("message_id, recipient_key, recipient_kind, mesh_id, member_id,"
                     " priority, seq, state, attempts, acked_at, lease_session, expires_at")
# The seeded recipient's past sessions: a delivered row keeps the lease
# session that took it (an acknowledgement clears only lease_until).
SEED_SESSIONS = 1000


def _statements(ids_sql, series_sql, delivered, queued, now):
    """
    The seeding statements and their parameters, for a dialect given by how
    it makes C{n} rows numbered C{x} (C{series_sql}) and a random-looking
    hex id from C{x} (C{ids_sql}). C{%s} placeholders (the runner turns them
    into C{?} for SQLite).
    """
    created = now - HOUR_MS
    expires = now + 7 * DAY_MS
    total = delivered + queued
    yield ("INSERT INTO meshes (id, name, slug, owner_pubkey, created_at)"
           " VALUES (%s, 'bench seed', 'bench-seed', 'seed-owner', %s)", (SEED_MESH, created))
    for member in (SEED_SENDER, SEED_RECIPIENT):
        yield ("INSERT INTO members (id, mesh_id, pubkey, display_name, role, joined_at)"
               " VALUES (%s, %s, %s, %s, 'member', %s)",
               (member, SEED_MESH, "pk-" + member, member, created))
    yield ("INSERT INTO messages (%s) SELECT %s, %%s, %%s, %%s, %%s, %%s, 'now', %%s, %%s, x,"
           " %%s, %%s FROM %s" % (_MESSAGE_COLUMNS, ids_sql, series_sql),
           (SEED_MESH, SEED_SENDER, "pk-" + SEED_SENDER, "pk-" + SEED_SENDER,
            "pk-" + SEED_RECIPIENT, NONCE, CIPHERTEXT, created, expires, total))
    # The first `delivered` seqs were confirmed, the rest are still queued.
    yield ("INSERT INTO deliveries (%s) SELECT id, %%s, 'member', mesh_id, %%s, 'now', seq,"
           " CASE WHEN seq <= %%s THEN 'delivered' ELSE 'queued' END,"
           " CASE WHEN seq <= %%s THEN 1 ELSE 0 END,"
           " CASE WHEN seq <= %%s THEN %%s ELSE NULL END,"
           " CASE WHEN seq <= %%s THEN 'seed-session-' || (seq %%%% %d) ELSE NULL END,"
           " expires_at FROM messages WHERE mesh_id = %%s" % (_DELIVERY_COLUMNS, SEED_SESSIONS),
           (SEED_RECIPIENT, SEED_RECIPIENT, delivered, delivered, delivered, created,
            delivered, SEED_MESH))
    yield ("INSERT INTO send_keys (sender_member_id, client_id, message_id, expires_at)"
           " SELECT sender_member_id, 'seed-' || seq, id, expires_at FROM messages"
           " WHERE mesh_id = %s", (SEED_MESH,))


def seed_sqlite(path, delivered, queued, now=None):
    """
    Seed the SQLite database at C{path}. Returns the seconds it took.
    """
    import sqlite3

    started = time.monotonic()
    now = int(time.time() * 1000) if now is None else now
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("PRAGMA cache_size = -262144")
        connection.execute("BEGIN")
        series = ("(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
                  " WHERE x < %s) SELECT x FROM c)")
        # Ids as the broker makes them (claudemesh.broker.ids.new_message_id):
        # the creation time in 12 hex digits, then 80 random bits.
        ids = "printf('%%012x', %d) || lower(hex(randomblob(10)))" % (now - HOUR_MS,)
        for sql, params in _statements(ids, series, delivered, queued, now):
            connection.execute(sql.replace("%s", "?").replace("%%", "%"), params)
        connection.execute("COMMIT")
        # No ANALYZE: the broker never runs it, so its SQLite plans without
        # statistics, and so must the bench.
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return time.monotonic() - started


def seed_postgres(database_url, schema, delivered, queued, now=None):
    """
    Seed the broker's tables in C{schema} of the Postgres database. Returns
    the seconds it took.
    """
    import psycopg2

    started = time.monotonic()
    now = int(time.time() * 1000) if now is None else now
    connection = psycopg2.connect(database_url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute('SET search_path TO "%s"' % (schema,))
            series = "generate_series(1, %s) AS x"
            ids = ("lpad(to_hex(%d::bigint), 12, '0')"
                   " || left(md5(x::text || random()::text), 20)" % (now - HOUR_MS,))
            for sql, params in _statements(ids, series, delivered, queued, now):
                cursor.execute(sql, params)
            # The broker's seq continues after the seeded ones. (VACUUM ANALYZE
            # below: autovacuum gathers statistics on a real server too.)
            cursor.execute("SELECT setval('message_seq', %s)", (delivered + queued,))
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute('SET search_path TO "%s"' % (schema,))
            cursor.execute("VACUUM ANALYZE")
    finally:
        connection.close()
    return time.monotonic() - started
