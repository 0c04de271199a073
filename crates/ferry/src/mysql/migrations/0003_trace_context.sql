-- ferry schema v3 for MariaDB 10.6+ and MySQL 8.0.29+: the producer's W3C trace context at
-- enqueue. `{p}` is the table prefix, `{partitions}` the partition count. Every statement is
-- idempotent (MySQL commits each DDL statement by itself). The trace context is kept in the
-- message's headers (`traceparent`, `tracestate`), as the Rust API keeps it, so no table
-- changes.

-- `{p}enqueue` with the trace context as two more arguments (procedures have no optional
-- arguments, so it has a name of its own; NULL for none). A `traceparent` (argument or
-- header) is checked as the Rust API checks it: version-traceid-parentid-flags in
-- lowercase hex with non-zero ids; a `tracestate` goes with one. Returns the row
-- `{p}enqueue` returns.
--   CALL {p}enqueue_traced('order', '42', 'order.paid', '{"total": 10}', NULL, NULL, NULL,
--        '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', NULL);
DROP PROCEDURE IF EXISTS {p}enqueue_traced;
CREATE PROCEDURE {p}enqueue_traced(
    IN p_aggregate_type VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_aggregate_id   VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_event_type     VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_payload        LONGBLOB,
    IN p_headers        LONGTEXT CHARACTER SET utf8mb4,
    IN p_partition_key  TEXT CHARACTER SET utf8mb4,
    IN p_id             BINARY(16),
    IN p_traceparent    VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_tracestate     TEXT CHARACTER SET utf8mb4
)
MODIFIES SQL DATA
BEGIN
    DECLARE v_headers LONGTEXT CHARACTER SET utf8mb4 DEFAULT COALESCE(p_headers, '{}');
    DECLARE v_parent TEXT CHARACTER SET utf8mb4;
    DECLARE v_key TEXT CHARACTER SET utf8mb4;
    DECLARE v_id BINARY(16);
    DECLARE v_partition INT;
    DECLARE v_version BIGINT;
    DECLARE v_sequence BIGINT;
    IF p_traceparent IS NOT NULL THEN
        IF JSON_CONTAINS_PATH(v_headers, 'one', '$.traceparent') THEN
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT =
                'enqueue: traceparent is given twice, as an argument and in the headers: pass it once';
        END IF;
        SET v_headers = JSON_SET(v_headers, '$.traceparent', p_traceparent);
    END IF;
    IF p_tracestate IS NOT NULL THEN
        IF JSON_CONTAINS_PATH(v_headers, 'one', '$.tracestate') THEN
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT =
                'enqueue: tracestate is given twice, as an argument and in the headers: pass it once';
        END IF;
        SET v_headers = JSON_SET(v_headers, '$.tracestate', p_tracestate);
    END IF;
    SET v_parent = JSON_UNQUOTE(JSON_EXTRACT(v_headers, '$.traceparent'));
    IF v_parent IS NOT NULL AND NOT (
        v_parent REGEXP '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$'
        AND CAST(v_parent AS BINARY) = CAST(LOWER(v_parent) AS BINARY)
        AND LEFT(v_parent, 2) <> 'ff'
        AND (LEFT(v_parent, 2) <> '00' OR CHAR_LENGTH(v_parent) = 55)
        AND SUBSTRING(v_parent, 4, 32) <> REPEAT('0', 32)
        AND SUBSTRING(v_parent, 37, 16) <> REPEAT('0', 16)
    ) THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT =
            'enqueue: traceparent is not a W3C trace context: use version-traceid-parentid-flags, 2, 32, 16 and 2 lowercase hex digits, non-zero ids (e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)';
    END IF;
    IF v_parent IS NULL AND JSON_CONTAINS_PATH(v_headers, 'one', '$.tracestate') THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT =
            'enqueue: a tracestate goes with a traceparent: pass both';
    END IF;

    SET v_key = COALESCE(p_partition_key, CONCAT(p_aggregate_type, '/', p_aggregate_id));
    SET v_id = COALESCE(p_id, {p}uuid_v7());
    SET v_partition = {p}partition_for(v_key, {partitions});

    -- The row lock taken here is held until the caller's transaction ends.
    INSERT INTO {p}aggregate_versions (aggregate_type, aggregate_id, version)
    VALUES (p_aggregate_type, p_aggregate_id, 1)
    ON DUPLICATE KEY UPDATE version = version + 1;
    SELECT version INTO v_version FROM {p}aggregate_versions
    WHERE aggregate_type = p_aggregate_type AND aggregate_id = p_aggregate_id;

    INSERT INTO {p}outbox (id, partition_no, aggregate_type, aggregate_id, version,
                           event_type, payload, headers, partition_key, created_at)
    VALUES (v_id, v_partition, p_aggregate_type, p_aggregate_id, v_version, p_event_type,
            p_payload, v_headers, v_key, UTC_TIMESTAMP(6));
    SET v_sequence = LAST_INSERT_ID();
    SELECT v_id AS message_id, v_version AS message_version,
           v_partition AS message_partition, v_sequence AS message_sequence;
END;

-- `{p}enqueue` (schema v1) is now `{p}enqueue_traced` without a trace context, so that a
-- `traceparent` passed in its headers is checked too.
DROP PROCEDURE IF EXISTS {p}enqueue;
CREATE PROCEDURE {p}enqueue(
    IN p_aggregate_type VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_aggregate_id   VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_event_type     VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_payload        LONGBLOB,
    IN p_headers        LONGTEXT CHARACTER SET utf8mb4,
    IN p_partition_key  TEXT CHARACTER SET utf8mb4,
    IN p_id             BINARY(16)
)
MODIFIES SQL DATA
BEGIN
    CALL {p}enqueue_traced(p_aggregate_type, p_aggregate_id, p_event_type, p_payload,
                           p_headers, p_partition_key, p_id, NULL, NULL);
END;
