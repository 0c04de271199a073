SELECT partition_no, blocked_reason, blocked_at AS blocked_at_ms
FROM {p}leases WHERE blocked_reason IS NOT NULL ORDER BY partition_no
