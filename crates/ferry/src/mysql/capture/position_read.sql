SELECT gtid_position, binlog_file, binlog_pos, committed_at
FROM {p}capture_position WHERE name = 'binlog'
