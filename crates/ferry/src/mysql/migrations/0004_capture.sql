-- ferry schema v4 for MariaDB 10.6+ and MySQL 8.0.29+: the position of log-based capture
-- (`capture.mode = "log"`). `{p}` is the table prefix. Idempotent, like every migration.
--
-- One row, written by the relay that holds the capture lock, only once the broker has
-- acknowledged and the relay has marked every message up to it: a relay (re)starting
-- streams the binlog from just after it. `gtid_position` is MariaDB's GTID list
-- (`domain-server-sequence,…`, what `@slave_connect_state` takes); the binlog file and
-- position of the same point and its commit time (unix seconds) measure the lag.
CREATE TABLE IF NOT EXISTS {p}capture_position (
    name           VARCHAR(64) NOT NULL PRIMARY KEY,
    gtid_position  TEXT NOT NULL,
    binlog_file    VARCHAR(512) NOT NULL,
    binlog_pos     BIGINT NOT NULL,
    committed_at   BIGINT NOT NULL,
    confirmed_at   DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
