SELECT partition_no, blocked_reason,
       (extract(epoch FROM blocked_at) * 1000)::int8 AS blocked_at_ms
FROM {p}leases WHERE blocked_reason IS NOT NULL ORDER BY partition_no
