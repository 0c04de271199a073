-- ferry schema v1 for MariaDB 10.6+ and MySQL 8.0.29+. `{p}` is the table prefix,
-- `{partitions}` the partition count P fixed at set-up. The same tables and semantics as
-- the PostgreSQL schema.
--
-- MySQL commits every DDL statement on its own, so a migration cannot be one transaction:
-- instead every statement is idempotent, and `ferry migrate` run again completes a run
-- that was cut short. The schema version is recorded only after the last statement.
--
-- Names used as keys are VARBINARY, compared byte for byte: the utf8mb4_bin collation
-- pads with spaces ('a' = 'a '), which would merge two aggregates. Times are DATETIME(6)
-- in UTC (UTC_TIMESTAMP), whatever the session's time zone.

CREATE TABLE IF NOT EXISTS {p}outbox (
    sequence       BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- UUID v7, 16 bytes in RFC 4122 order.
    id             BINARY(16) NOT NULL,
    partition_no   INT NOT NULL,
    aggregate_type VARBINARY(255) NOT NULL,
    aggregate_id   VARBINARY(255) NOT NULL,
    version        BIGINT NOT NULL,
    event_type     VARCHAR(255) NOT NULL,
    payload        LONGBLOB NOT NULL,
    headers        JSON NOT NULL,
    partition_key  TEXT NOT NULL,
    created_at     DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    published_at   DATETIME(6) NULL,
    UNIQUE KEY outbox_id (id),
    -- The relay's read path: unpublished rows (published_at IS NULL) of one partition in
    -- sequence order.
    KEY outbox_pending (partition_no, published_at, sequence),
    -- Retention purge of rows kept after publishing.
    KEY outbox_published (published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row per aggregate; updating it in the producer's transaction locks it until commit,
-- which serialises writers of one aggregate, so version order equals commit order (G3).
CREATE TABLE IF NOT EXISTS {p}aggregate_versions (
    aggregate_type VARBINARY(255) NOT NULL,
    aggregate_id   VARBINARY(255) NOT NULL,
    version        BIGINT NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) ENGINE = InnoDB;

-- One row per partition. `epoch` is the fencing token: +1 on every grant. `clean` says the
-- last owner released after marking all it published; `checkpoint` is a sink position
-- below which that owner left nothing unmarked.
CREATE TABLE IF NOT EXISTS {p}leases (
    partition_no   INT NOT NULL PRIMARY KEY,
    owner          VARBINARY(255) NULL,
    epoch          BIGINT NOT NULL DEFAULT 0,
    expires_at     DATETIME(6) NOT NULL DEFAULT '1970-01-01 00:00:00',
    clean          BOOLEAN NOT NULL DEFAULT TRUE,
    checkpoint     BIGINT NULL,
    blocked_reason TEXT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Live relays, for the fair share of partitions.
CREATE TABLE IF NOT EXISTS {p}relays (
    relay_id   VARBINARY(255) NOT NULL PRIMARY KEY,
    expires_at DATETIME(6) NOT NULL
) ENGINE = InnoDB;

-- Consumer side: processed ids and last applied version per aggregate, per consumer.
CREATE TABLE IF NOT EXISTS {p}inbox (
    consumer       VARBINARY(255) NOT NULL,
    id             BINARY(16) NOT NULL,
    aggregate_type VARBINARY(255) NOT NULL,
    aggregate_id   VARBINARY(255) NOT NULL,
    version        BIGINT NOT NULL,
    processed_at   DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (consumer, id)
) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS {p}inbox_versions (
    consumer       VARBINARY(255) NOT NULL,
    aggregate_type VARBINARY(255) NOT NULL,
    aggregate_id   VARBINARY(255) NOT NULL,
    version        BIGINT NOT NULL,
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
) ENGINE = InnoDB;

-- 32-bit FNV-1a of the key's bytes, mod P: the same as ferry's Rust `partition_for`. A
-- text argument arrives here as its utf8mb4 bytes.
CREATE FUNCTION IF NOT EXISTS {p}partition_for(p_key LONGBLOB, p_partitions INT) RETURNS INT
DETERMINISTIC NO SQL
BEGIN
    DECLARE h BIGINT UNSIGNED DEFAULT 2166136261;
    DECLARE i INT DEFAULT 1;
    DECLARE n INT DEFAULT LENGTH(p_key);
    WHILE i <= n DO
        SET h = ((h ^ ORD(SUBSTRING(p_key, i, 1))) * 16777619) & 4294967295;
        SET i = i + 1;
    END WHILE;
    RETURN h % p_partitions;
END;

-- UUID v7: 48-bit Unix milliseconds, then random bits, version 7, RFC 4122 variant.
CREATE FUNCTION IF NOT EXISTS {p}uuid_v7() RETURNS BINARY(16)
NOT DETERMINISTIC NO SQL
BEGIN
    DECLARE r BINARY(10) DEFAULT RANDOM_BYTES(10);
    DECLARE ms BIGINT DEFAULT
        TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000;
    RETURN CONCAT(
        UNHEX(LPAD(HEX(ms), 12, '0')),
        CHAR(0x70 | (ORD(SUBSTRING(r, 1, 1)) & 0x0F)), SUBSTRING(r, 2, 1),
        CHAR(0x80 | (ORD(SUBSTRING(r, 3, 1)) & 0x3F)), SUBSTRING(r, 4, 7));
END;

-- Enqueue from any language inside its own transaction: assigns the id (unless given), the
-- aggregate's next version and the partition, exactly as the Rust API does (which calls
-- it). Every argument is required; NULL takes the default for p_headers ('{}'),
-- p_partition_key (aggregate_type/aggregate_id) and p_id (a new UUID v7). Returns one row:
-- message_id, message_version, message_partition, message_sequence.
CREATE PROCEDURE IF NOT EXISTS {p}enqueue(
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
    DECLARE v_key TEXT CHARACTER SET utf8mb4;
    DECLARE v_id BINARY(16);
    DECLARE v_partition INT;
    DECLARE v_version BIGINT;
    DECLARE v_sequence BIGINT;
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
            p_payload, COALESCE(p_headers, '{}'), v_key, UTC_TIMESTAMP(6));
    SET v_sequence = LAST_INSERT_ID();
    SELECT v_id AS message_id, v_version AS message_version,
           v_partition AS message_partition, v_sequence AS message_sequence;
END;
