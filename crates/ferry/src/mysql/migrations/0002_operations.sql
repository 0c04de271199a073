-- ferry schema v2 for MariaDB 10.6+ and MySQL 8.0.29+: what operators need. `{p}` is the
-- table prefix. Every statement is idempotent (MySQL commits each DDL statement by
-- itself): a column or index is added only if the information schema lacks it.

-- Since when a partition is blocked, and an operator's request to retry its head now.
SET @ferry_ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
        AND table_name = '{p}leases' AND column_name = 'blocked_at') = 0,
    'ALTER TABLE {p}leases ADD COLUMN blocked_at DATETIME(6) NULL', 'DO 0');
PREPARE ferry_ddl FROM @ferry_ddl;
EXECUTE ferry_ddl;
DEALLOCATE PREPARE ferry_ddl;
SET @ferry_ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE()
        AND table_name = '{p}leases' AND column_name = 'retry_requested') = 0,
    'ALTER TABLE {p}leases ADD COLUMN retry_requested BOOLEAN NOT NULL DEFAULT FALSE', 'DO 0');
PREPARE ferry_ddl FROM @ferry_ddl;
EXECUTE ferry_ddl;
DEALLOCATE PREPARE ferry_ddl;

-- Messages moved out of the flow: skipped by an operator, or parked with their aggregate
-- by the `park-aggregate` policy. They keep every outbox column, their sequence included,
-- so that a requeued message goes back exactly where it was.
CREATE TABLE IF NOT EXISTS {p}parked (
    sequence        BIGINT NOT NULL PRIMARY KEY,
    id              BINARY(16) NOT NULL,
    partition_no    INT NOT NULL,
    aggregate_type  VARBINARY(255) NOT NULL,
    aggregate_id    VARBINARY(255) NOT NULL,
    version         BIGINT NOT NULL,
    event_type      VARCHAR(255) NOT NULL,
    payload         LONGBLOB NOT NULL,
    headers         JSON NOT NULL,
    partition_key   TEXT NOT NULL,
    created_at      DATETIME(6) NOT NULL,
    parked_at       DATETIME(6) NOT NULL,
    parked_by       VARCHAR(255) NOT NULL,
    reason          TEXT NOT NULL,
    -- The aggregate's later messages wait in the outbox until this one is requeued.
    holds_aggregate BOOLEAN NOT NULL,
    UNIQUE KEY parked_id (id),
    -- What the relay's fetch checks for every row: is its aggregate held?
    KEY parked_holds (aggregate_type, aggregate_id, holds_aggregate),
    KEY parked_at (parked_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Cleanup of processed ids past their keep time.
SET @ferry_ddl = IF((SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE()
        AND table_name = '{p}inbox' AND index_name = 'inbox_processed') = 0,
    'CREATE INDEX inbox_processed ON {p}inbox (processed_at)', 'DO 0');
PREPARE ferry_ddl FROM @ferry_ddl;
EXECUTE ferry_ddl;
DEALLOCATE PREPARE ferry_ddl;

-- The inbox for consumers in any language, inside their own transaction: records the
-- message and says what to do with it, exactly as the Rust inbox does (which calls it).
-- Returns one row (decision, last_version): 'apply' (new id, version above the
-- aggregate's last applied one, now advanced: apply the message's effect in this same
-- transaction), 'duplicate' (this consumer recorded the id before) or 'stale' (a version
-- at or below the last applied one). `last_version` is the aggregate's last applied
-- version before this message (0 if none). The aggregate's version row stays locked until
-- the transaction ends, so instances of one consumer decide one after the other.
--   CALL {p}inbox_admit('billing', UNHEX(REPLACE('0190…', '-', '')), 'order', '42', 7);
CREATE PROCEDURE IF NOT EXISTS {p}inbox_admit(
    IN p_consumer       VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_id             BINARY(16),
    IN p_aggregate_type VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_aggregate_id   VARCHAR(255) CHARACTER SET utf8mb4,
    IN p_version        BIGINT
)
MODIFIES SQL DATA
BEGIN
    DECLARE v_duplicate BOOLEAN DEFAULT FALSE;
    DECLARE v_last BIGINT;
    DECLARE CONTINUE HANDLER FOR 1062 SET v_duplicate = TRUE;
    IF p_consumer IS NULL OR p_id IS NULL OR p_aggregate_type IS NULL OR p_aggregate_id IS NULL
       OR p_version IS NULL OR p_version < 1 THEN
        SIGNAL SQLSTATE '22023'
            SET MESSAGE_TEXT = 'inbox_admit: every argument is required and the version must be 1 or more';
    END IF;
    INSERT INTO {p}inbox (consumer, id, aggregate_type, aggregate_id, version, processed_at)
    VALUES (p_consumer, p_id, p_aggregate_type, p_aggregate_id, p_version, UTC_TIMESTAMP(6));
    IF v_duplicate THEN
        SELECT 'duplicate' AS decision, CAST(0 AS SIGNED) AS last_version;
    ELSE
        -- Creates and locks the aggregate's row (a primary-key duplicate takes a record
        -- lock only, no gap lock), then reads the latest committed version.
        INSERT INTO {p}inbox_versions (consumer, aggregate_type, aggregate_id, version)
        VALUES (p_consumer, p_aggregate_type, p_aggregate_id, 0)
        ON DUPLICATE KEY UPDATE version = version;
        SELECT version INTO v_last FROM {p}inbox_versions
        WHERE consumer = p_consumer AND aggregate_type = p_aggregate_type
          AND aggregate_id = p_aggregate_id
        FOR UPDATE;
        IF p_version <= v_last THEN
            SELECT 'stale' AS decision, v_last AS last_version;
        ELSE
            UPDATE {p}inbox_versions SET version = p_version
            WHERE consumer = p_consumer AND aggregate_type = p_aggregate_type
              AND aggregate_id = p_aggregate_id;
            SELECT 'apply' AS decision, v_last AS last_version;
        END IF;
    END IF;
END;
