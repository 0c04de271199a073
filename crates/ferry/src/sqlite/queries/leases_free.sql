SELECT partition_no, epoch, clean, checkpoint, MAX({now} - expires_at, 0) AS since_expiry_ms
FROM {p}leases
WHERE owner IS NULL OR expires_at <= {now}
ORDER BY partition_no LIMIT $1
