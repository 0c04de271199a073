-- ferry service schema v1 for PostgreSQL: the reliable message service's messages
-- (`ferry serve`), beside ferry's outbox in the same database. `{p}` is the table prefix.
-- Applied by `ferry migrate` in one transaction, after the outbox's own schema.

CREATE TABLE {p}service_messages (
    id             uuid PRIMARY KEY,
    status         text NOT NULL CHECK (status IN ('prepared', 'confirmed', 'delivered',
                       'completed', 'cancelled', 'check_failed', 'dead_lettered')),
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    payload        bytea NOT NULL,
    headers        jsonb NOT NULL DEFAULT '{}',
    -- NULL: the default `aggregate_type/aggregate_id`.
    partition_key  text,
    check_url      text NOT NULL,
    -- Assigned by the outbox on confirmation; every redelivery keeps it.
    version        bigint,
    -- Check-backs since prepare or the last retry.
    checks         integer NOT NULL DEFAULT 0,
    -- Deliveries since confirmation or the last retry (compared with max_deliveries).
    deliveries     integer NOT NULL DEFAULT 0,
    -- Deliveries ever: the attempt number a redelivery carries to the broker's dedup id.
    attempts       integer NOT NULL DEFAULT 0,
    -- Why the message is in its status (who moved it, the last check-back failure).
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- prepared only: when the next check-back is due (or a claim runs out).
    next_check_at  timestamptz,
    confirmed_at   timestamptz,
    delivered_at   timestamptz,
    -- delivered only: when the message is redelivered (or dead-lettered) without an ack.
    ack_deadline   timestamptz
);

-- What each loop reads: due check-backs, confirmed messages waiting for the relay, due
-- redeliveries, and finished messages past retention.
CREATE INDEX {p}service_due_checks ON {p}service_messages (next_check_at) WHERE status = 'prepared';
CREATE INDEX {p}service_confirmed ON {p}service_messages (confirmed_at) WHERE status = 'confirmed';
CREATE INDEX {p}service_due_acks ON {p}service_messages (ack_deadline) WHERE status = 'delivered';
CREATE INDEX {p}service_finished ON {p}service_messages (updated_at)
    WHERE status IN ('completed', 'cancelled');
-- Listings by status in id order, and the counts per status.
CREATE INDEX {p}service_by_status ON {p}service_messages (status, id);
