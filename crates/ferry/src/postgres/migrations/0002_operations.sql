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

-- The inbox for consumers in any language, inside their own transaction: records the
-- message and says what to do with it, exactly as the Rust inbox does (which calls it):
-- 'apply' (new id, version above the aggregate's last applied one, now advanced: apply
-- the message's effect in this same transaction), 'duplicate' (this consumer recorded
-- the id before) or 'stale' (a version at or below the last applied one, also when
-- another instance of the consumer applied a newer one meanwhile). `last_version` is the
-- aggregate's last applied version before this message (0 if none).
--   SELECT * FROM {p}inbox_admit('billing', '0190…'::uuid, 'order', '42', 7);
CREATE FUNCTION {p}inbox_admit(
    p_consumer       text,
    p_id             uuid,
    p_aggregate_type text,
    p_aggregate_id   text,
    p_version        bigint
) RETURNS TABLE (decision text, last_version bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
BEGIN
    IF p_consumer IS NULL OR p_id IS NULL OR p_aggregate_type IS NULL OR p_aggregate_id IS NULL
       OR p_version IS NULL OR p_version < 1 THEN
        RAISE EXCEPTION 'inbox_admit: every argument is required and the version must be 1 or more'
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO {p}inbox (consumer, id, aggregate_type, aggregate_id, version)
    VALUES (p_consumer, p_id, p_aggregate_type, p_aggregate_id, p_version)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'duplicate'::text, 0::bigint;
        RETURN;
    END IF;
    SELECT v.version INTO v_last FROM {p}inbox_versions v
    WHERE v.consumer = p_consumer AND v.aggregate_type = p_aggregate_type
      AND v.aggregate_id = p_aggregate_id;
    v_last := coalesce(v_last, 0);
    IF p_version <= v_last THEN
        RETURN QUERY SELECT 'stale'::text, v_last;
        RETURN;
    END IF;
    -- Only ever moves forward; the row lock it takes orders instances of the consumer.
    INSERT INTO {p}inbox_versions AS v (consumer, aggregate_type, aggregate_id, version)
    VALUES (p_consumer, p_aggregate_type, p_aggregate_id, p_version)
    ON CONFLICT (consumer, aggregate_type, aggregate_id)
    DO UPDATE SET version = excluded.version WHERE v.version < excluded.version;
    IF NOT FOUND THEN
        SELECT v.version INTO v_last FROM {p}inbox_versions v
        WHERE v.consumer = p_consumer AND v.aggregate_type = p_aggregate_type
          AND v.aggregate_id = p_aggregate_id;
        RETURN QUERY SELECT 'stale'::text, v_last;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'apply'::text, v_last;
END $$;
