-- Random order spreads relays that start together; rows another relay is granting
-- right now are skipped, not waited for.
SELECT partition_no, epoch, clean, checkpoint,
       greatest(extract(epoch FROM now() - expires_at) * 1000, 0)::int8 AS since_expiry_ms
FROM {p}leases
WHERE owner IS NULL OR expires_at <= now()
ORDER BY random() LIMIT $1
FOR UPDATE SKIP LOCKED
