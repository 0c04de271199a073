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
