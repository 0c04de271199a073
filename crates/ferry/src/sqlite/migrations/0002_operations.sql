-- ferry schema version 2 for SQLite: what operators need. `{p}` is the table prefix.

-- Since when a partition is blocked (unix milliseconds), and an operator's request to
-- retry its head now.
ALTER TABLE {p}leases ADD COLUMN blocked_at INTEGER;
ALTER TABLE {p}leases ADD COLUMN retry_requested INTEGER NOT NULL DEFAULT 0;

-- Messages moved out of the flow: skipped by an operator, or parked with their aggregate
-- by the `park-aggregate` policy. They keep every outbox column, their sequence included,
-- so that a requeued message goes back exactly where it was.
CREATE TABLE {p}parked (
    sequence        INTEGER PRIMARY KEY,
    id              BLOB NOT NULL UNIQUE,
    partition_no    INTEGER NOT NULL,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    version         INTEGER NOT NULL,
    event_type      TEXT NOT NULL,
    payload         BLOB NOT NULL,
    headers         TEXT NOT NULL,
    partition_key   TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    -- Unix milliseconds.
    parked_at       INTEGER NOT NULL,
    parked_by       TEXT NOT NULL,
    reason          TEXT NOT NULL,
    -- The aggregate's later messages wait in the outbox until this one is requeued.
    holds_aggregate INTEGER NOT NULL
) STRICT;
-- What the relay's fetch checks for every row: is its aggregate held?
CREATE INDEX {p}parked_holds ON {p}parked (aggregate_type, aggregate_id) WHERE holds_aggregate;
CREATE INDEX {p}parked_aggregate ON {p}parked (aggregate_type, aggregate_id, sequence);
CREATE INDEX {p}parked_at ON {p}parked (parked_at);

-- Cleanup of processed ids past their keep time.
CREATE INDEX {p}inbox_processed ON {p}inbox (processed_at);
