-- The first start of log capture: the stream begins at the server's position then. A row
-- already there (another relay's origin, or confirmed positions) is kept.
INSERT IGNORE INTO {p}capture_position
    (name, gtid_position, binlog_file, binlog_pos, committed_at, confirmed_at)
VALUES ('binlog', $1, $2, $3, $4, {now})
