SELECT partition_no, blocked_reason,
       CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', blocked_at) DIV 1000 AS SIGNED)
           AS blocked_at_ms
FROM {p}leases WHERE blocked_reason IS NOT NULL ORDER BY partition_no
