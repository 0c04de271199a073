-- Random order spreads relays that start together; rows another relay is granting
-- right now are skipped, not waited for.
SELECT partition_no, epoch, clean, checkpoint,
       GREATEST(TIMESTAMPDIFF(MICROSECOND, expires_at, {now}) DIV 1000, 0) AS since_expiry_ms
FROM {p}leases
WHERE owner IS NULL OR expires_at <= {now}
ORDER BY RAND() LIMIT $1
FOR UPDATE SKIP LOCKED
