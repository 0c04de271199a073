-- ferry schema v2 for PostgreSQL: what operators need. `{p}` is the table prefix.
-- Applied by `ferry migrate` in one transaction.

-- Since when a partition is blocked, and an operator's request to retry its head now.
ALTER TABLE {p}leases
    ADD COLUMN blocked_at timestamptz,
    ADD COLUMN retry_requested boolean NOT NULL DEFAULT false;

-- Messages moved out of the flow: skipped by an operator, or parked with their aggregate
-- by the `park-aggregate` policy. They keep every outbox column, their sequence included,
-- so that a requeued message goes back exactly where it was.
CREATE TABLE {p}parked (
    sequence        bigint PRIMARY KEY,
    id              uuid NOT NULL UNIQUE,
    partition_no    integer NOT NULL,
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    version         bigint NOT NULL,
    event_type      text NOT NULL,
    payload         bytea NOT NULL,
    headers         jsonb NOT NULL,
    partition_key   text NOT NULL,
    created_at      timestamptz NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    parked_by       text NOT NULL,
    reason          text NOT NULL,
    -- The aggregate's later messages wait in the outbox until this one is requeued.
    holds_aggregate boolean NOT NULL
);
-- What the relay's fetch checks for every row: is its aggregate held?
CREATE INDEX {p}parked_holds ON {p}parked (aggregate_type, aggregate_id) WHERE holds_aggregate;
CREATE INDEX {p}parked_aggregate ON {p}parked (aggregate_type, aggregate_id, sequence);
CREATE INDEX {p}parked_at ON {p}parked (parked_at);

-- Cleanup of processed ids past their keep time.
CREATE INDEX {p}inbox_processed ON {p}inbox (processed_at);
