-- Run on the connection that holds the capture lock, and only while it holds it: a relay
-- that lost the lock (its connection died and another took over) changes nothing.
UPDATE {p}capture_position
SET gtid_position = $1, binlog_file = $2, binlog_pos = $3, committed_at = $4,
    confirmed_at = {now}
WHERE name = 'binlog' AND IS_USED_LOCK($5) = CONNECTION_ID()
