-- ferry schema v3 for PostgreSQL: the producer's W3C trace context at enqueue. `{p}` is the
-- table prefix, `{partitions}` the partition count. Applied by `ferry migrate` in one
-- transaction. The trace context is kept in the message's headers (`traceparent`,
-- `tracestate`), as the Rust API keeps it, so no table changes.

-- The headers with the trace context merged in, checked as the Rust API checks them: a
-- `traceparent` (argument or header) is version-traceid-parentid-flags in lowercase hex
-- with non-zero ids, and a `tracestate` goes with one.
CREATE FUNCTION {p}trace_headers(p_headers jsonb, p_traceparent text, p_tracestate text)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_headers jsonb := coalesce(p_headers, '{}');
    v_parent text;
BEGIN
    IF p_traceparent IS NOT NULL THEN
        IF v_headers ? 'traceparent' THEN
            RAISE EXCEPTION 'enqueue: traceparent is given twice, as an argument and in the headers: pass it once'
                USING ERRCODE = '22023';
        END IF;
        v_headers := v_headers || jsonb_build_object('traceparent', p_traceparent);
    END IF;
    IF p_tracestate IS NOT NULL THEN
        IF v_headers ? 'tracestate' THEN
            RAISE EXCEPTION 'enqueue: tracestate is given twice, as an argument and in the headers: pass it once'
                USING ERRCODE = '22023';
        END IF;
        v_headers := v_headers || jsonb_build_object('tracestate', p_tracestate);
    END IF;
    v_parent := v_headers ->> 'traceparent';
    IF v_parent IS NOT NULL AND NOT (
        v_parent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$'
        AND left(v_parent, 2) <> 'ff'
        AND (left(v_parent, 2) <> '00' OR length(v_parent) = 55)
        AND substr(v_parent, 4, 32) <> repeat('0', 32)
        AND substr(v_parent, 37, 16) <> repeat('0', 16)
    ) THEN
        RAISE EXCEPTION 'enqueue: traceparent "%" is not a W3C trace context: use version-traceid-parentid-flags, 2, 32, 16 and 2 lowercase hex digits, non-zero ids (e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)', v_parent
            USING ERRCODE = '22023';
    END IF;
    IF v_headers ? 'tracestate' AND v_parent IS NULL THEN
        RAISE EXCEPTION 'enqueue: a tracestate goes with a traceparent: pass both'
            USING ERRCODE = '22023';
    END IF;
    RETURN v_headers;
END $$;

-- `enqueue` and `enqueue_bytes` take the trace context as two more optional arguments.
-- A function's arguments cannot change in place, and an overload beside the old one
-- would make every call without them ambiguous; so they are replaced, and calls written
-- for schema v1 and v2 keep working (the new arguments default to NULL).
DROP FUNCTION {p}enqueue(text, text, text, jsonb, jsonb, text, uuid);
DROP FUNCTION {p}enqueue_bytes(text, text, text, bytea, jsonb, text, uuid);

CREATE FUNCTION {p}enqueue_bytes(
    p_aggregate_type text,
    p_aggregate_id   text,
    p_event_type     text,
    p_payload        bytea,
    p_headers        jsonb DEFAULT '{}',
    p_partition_key  text DEFAULT NULL,
    p_id             uuid DEFAULT NULL,
    p_traceparent    text DEFAULT NULL,
    p_tracestate     text DEFAULT NULL
) RETURNS TABLE (message_id uuid, message_version bigint, message_partition integer, message_sequence bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_key text := coalesce(p_partition_key, p_aggregate_type || '/' || p_aggregate_id);
    v_headers jsonb := {p}trace_headers(p_headers, p_traceparent, p_tracestate);
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
            v_headers, v_key)
    RETURNING o.id, o.version, o.partition_no, o.sequence;
END $$;

-- The JSON form: `SELECT * FROM {p}enqueue('order', '42', 'order.paid', '{"total": 10}',
-- p_traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')`.
CREATE FUNCTION {p}enqueue(
    p_aggregate_type text,
    p_aggregate_id   text,
    p_event_type     text,
    p_payload        jsonb,
    p_headers        jsonb DEFAULT '{}',
    p_partition_key  text DEFAULT NULL,
    p_id             uuid DEFAULT NULL,
    p_traceparent    text DEFAULT NULL,
    p_tracestate     text DEFAULT NULL
) RETURNS TABLE (message_id uuid, message_version bigint, message_partition integer, message_sequence bigint)
LANGUAGE sql AS $$
    SELECT * FROM {p}enqueue_bytes(p_aggregate_type, p_aggregate_id, p_event_type,
        convert_to(p_payload::text, 'UTF8'), p_headers, p_partition_key, p_id,
        p_traceparent, p_tracestate)
$$;
