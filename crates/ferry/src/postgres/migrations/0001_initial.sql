-- ferry schema v1 for PostgreSQL. `{p}` is the table prefix, `{partitions}` the partition
-- count P fixed at set-up. Applied by `ferry migrate` in one transaction.

CREATE TABLE {p}outbox (
    sequence       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             uuid NOT NULL UNIQUE,
    partition_no   integer NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    version        bigint NOT NULL,
    event_type     text NOT NULL,
    payload        bytea NOT NULL,
    headers        jsonb NOT NULL DEFAULT '{}',
    partition_key  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);
-- The relay's read path: unpublished rows of one partition in sequence order.
CREATE INDEX {p}outbox_pending ON {p}outbox (partition_no, sequence) WHERE published_at IS NULL;
-- Retention purge of rows kept after publishing.
CREATE INDEX {p}outbox_published ON {p}outbox (published_at) WHERE published_at IS NOT NULL;

-- One row per aggregate; updating it in the producer's transaction serialises writers of
-- one aggregate, so version order equals commit order (G3).
CREATE TABLE {p}aggregate_versions (
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    version        bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- One row per partition. `epoch` is the fencing token: +1 on every grant. `clean` says the
-- last owner released after marking all it published; `checkpoint` is a sink position
-- below which that owner left nothing unmarked.
CREATE TABLE {p}leases (
    partition_no   integer PRIMARY KEY,
    owner          text,
    epoch          bigint NOT NULL DEFAULT 0,
    expires_at     timestamptz NOT NULL DEFAULT 'epoch',
    clean          boolean NOT NULL DEFAULT true,
    checkpoint     bigint,
    blocked_reason text
);
INSERT INTO {p}leases (partition_no) SELECT generate_series(0, {partitions} - 1);

-- Live relays, for the fair share of partitions.
CREATE TABLE {p}relays (
    relay_id   text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

-- Consumer side: processed ids and last applied version per aggregate, per consumer.
CREATE TABLE {p}inbox (
    consumer       text NOT NULL,
    id             uuid NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    version        bigint NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, id)
);
CREATE TABLE {p}inbox_versions (
    consumer       text NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    version        bigint NOT NULL,
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
);

-- Wake the relay once per producing statement and partition (PostgreSQL folds repeats
-- within a transaction), whoever inserted: the Rust API, the SQL function, a raw INSERT.
CREATE FUNCTION {p}notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{p}outbox', partition_no::text)
    FROM (SELECT DISTINCT partition_no FROM new_rows) AS touched;
    RETURN NULL;
END $$;
CREATE TRIGGER {p}outbox_notify AFTER INSERT ON {p}outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {p}notify();

-- 32-bit FNV-1a of the key's UTF-8 bytes, mod P: the same as ferry's Rust `partition_for`.
CREATE FUNCTION {p}partition_for(p_key text, p_partitions integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    h bigint := 2166136261;
    b bytea := convert_to(p_key, 'UTF8');
BEGIN
    FOR i IN 0 .. length(b) - 1 LOOP
        h := ((h # get_byte(b, i)) * 16777619) & 4294967295;
    END LOOP;
    RETURN (h % p_partitions)::integer;
END $$;

-- UUID v7: 48-bit Unix milliseconds, then random bits, version 7, RFC 4122 variant.
CREATE FUNCTION {p}uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- Enqueue from any language inside its own transaction: assigns the id (unless given), the
-- aggregate's next version and the partition, exactly as the Rust API does.
CREATE FUNCTION {p}enqueue_bytes(
    p_aggregate_type text,
    p_aggregate_id   text,
    p_event_type     text,
    p_payload        bytea,
    p_headers        jsonb DEFAULT '{}',
    p_partition_key  text DEFAULT NULL,
    p_id             uuid DEFAULT NULL
) RETURNS TABLE (message_id uuid, message_version bigint, message_partition integer, message_sequence bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_key text := coalesce(p_partition_key, p_aggregate_type || '/' || p_aggregate_id);
    v_version bigint;
BEGIN
    INSERT INTO {p}aggregate_versions AS av (aggregate_type, aggregate_id, version)
    VALUES (p_aggregate_type, p_aggregate_id, 1)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = av.version + 1
    RETURNING av.version INTO v_version;

    RETURN QUERY
    INSERT INTO {p}outbox AS o (id, partition_no, aggregate_type, aggregate_id, version,
                                event_type, payload, headers, partition_key)
    VALUES (coalesce(p_id, {p}uuid_v7()), {p}partition_for(v_key, {partitions}),
            p_aggregate_type, p_aggregate_id, v_version, p_event_type, p_payload,
            coalesce(p_headers, '{}'), v_key)
    RETURNING o.id, o.version, o.partition_no, o.sequence;
END $$;

-- The JSON form: `SELECT * FROM {p}enqueue('order', '42', 'order.paid', '{"total": 10}')`.
CREATE FUNCTION {p}enqueue(
    p_aggregate_type text,
    p_aggregate_id   text,
    p_event_type     text,
    p_payload        jsonb,
    p_headers        jsonb DEFAULT '{}',
    p_partition_key  text DEFAULT NULL,
    p_id             uuid DEFAULT NULL
) RETURNS TABLE (message_id uuid, message_version bigint, message_partition integer, message_sequence bigint)
LANGUAGE sql AS $$
    SELECT * FROM {p}enqueue_bytes(p_aggregate_type, p_aggregate_id, p_event_type,
        convert_to(p_payload::text, 'UTF8'), p_headers, p_partition_key, p_id)
$$;
