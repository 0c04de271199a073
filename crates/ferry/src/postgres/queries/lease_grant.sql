-- A grant clears the previous owner's blocked reason: the new owner records it again if
-- the message still fails.
UPDATE {p}leases
SET owner = $1, epoch = epoch + 1, expires_at = now() + make_interval(secs => $2::float8 / 1000),
    clean = false, blocked_reason = NULL
WHERE partition_no = $3 AND epoch = $4
