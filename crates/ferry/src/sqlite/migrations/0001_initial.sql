-- ferry schema version 1 for SQLite. `{p}` is the table prefix.
-- Released migrations never change: a new version appends a new file.
-- Table and column names match the PostgreSQL store's.

CREATE TABLE {p}outbox (
    -- AUTOINCREMENT: a sequence is never reused, even after the newest rows were deleted.
    sequence       INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The message id (UUID v7) as 16 bytes.
    id             BLOB NOT NULL UNIQUE,
    -- fnv1a_32(utf8(partition_key)) mod the `partitions` row of {p}meta.
    partition_no   INTEGER NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    version        INTEGER NOT NULL,
    event_type     TEXT NOT NULL,
    payload        BLOB NOT NULL,
    -- A JSON object of text values.
    headers        TEXT NOT NULL DEFAULT '{}',
    partition_key  TEXT NOT NULL,
    -- RFC 3339 UTC with milliseconds, from the store's clock.
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Set instead of deleting the row when the store keeps published rows (retention).
    published_at   TEXT
) STRICT;

-- What the relay reads: the unpublished rows of one partition in sequence order.
CREATE INDEX {p}outbox_unpublished ON {p}outbox (partition_no, sequence)
    WHERE published_at IS NULL;

-- What the purge reads; empty unless published rows are kept.
CREATE INDEX {p}outbox_published ON {p}outbox (published_at)
    WHERE published_at IS NOT NULL;

-- The last version given to each aggregate. Bumping it inside the producer's transaction
-- serialises the writers of one aggregate, so version order is commit order.
CREATE TABLE {p}aggregate_versions (
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    version        INTEGER NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) STRICT, WITHOUT ROWID;

-- One row per partition. Times are unix milliseconds from the store's clock.
CREATE TABLE {p}leases (
    partition_no   INTEGER PRIMARY KEY,
    owner          TEXT,
    -- Incremented by every grant: the fencing token.
    epoch          INTEGER NOT NULL DEFAULT 0,
    expires_at     INTEGER NOT NULL DEFAULT 0,
    -- 1 when the last owner released the partition with everything it published marked.
    clean          INTEGER NOT NULL DEFAULT 1,
    -- The last sink position recorded by an owner.
    checkpoint     INTEGER,
    blocked_reason TEXT
) STRICT;

-- Relays alive, for sharing partitions fairly. Times are unix milliseconds.
CREATE TABLE {p}relays (
    relay_id   TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Consumer side: ids processed per consumer...
CREATE TABLE {p}inbox (
    consumer       TEXT NOT NULL,
    id             BLOB NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    version        INTEGER NOT NULL,
    processed_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer, id)
) STRICT, WITHOUT ROWID;

-- ...and the last version applied per consumer and aggregate.
CREATE TABLE {p}inbox_versions (
    consumer       TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    version        INTEGER NOT NULL,
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
) STRICT, WITHOUT ROWID;
