-- ferry service schema v1 for SQLite: the reliable message service's messages
-- (`ferry serve`), beside ferry's outbox in the same database file. `{p}` is the table
-- prefix. Columns match the PostgreSQL table's; times are unix milliseconds from SQLite's
-- clock, ids 16-byte blobs like the outbox's.

CREATE TABLE {p}service_messages (
    id             BLOB PRIMARY KEY,
    status         TEXT NOT NULL CHECK (status IN ('prepared', 'confirmed', 'delivered',
                       'completed', 'cancelled', 'check_failed', 'dead_lettered')),
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    payload        BLOB NOT NULL,
    headers        TEXT NOT NULL DEFAULT '{}',
    partition_key  TEXT,
    check_url      TEXT NOT NULL,
    version        INTEGER,
    checks         INTEGER NOT NULL DEFAULT 0,
    deliveries     INTEGER NOT NULL DEFAULT 0,
    attempts       INTEGER NOT NULL DEFAULT 0,
    reason         TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    next_check_at  INTEGER,
    confirmed_at   INTEGER,
    delivered_at   INTEGER,
    ack_deadline   INTEGER
) STRICT, WITHOUT ROWID;

CREATE INDEX {p}service_due_checks ON {p}service_messages (next_check_at) WHERE status = 'prepared';
CREATE INDEX {p}service_confirmed ON {p}service_messages (confirmed_at) WHERE status = 'confirmed';
CREATE INDEX {p}service_due_acks ON {p}service_messages (ack_deadline) WHERE status = 'delivered';
CREATE INDEX {p}service_finished ON {p}service_messages (updated_at)
    WHERE status IN ('completed', 'cancelled');
CREATE INDEX {p}service_by_status ON {p}service_messages (status, id);
