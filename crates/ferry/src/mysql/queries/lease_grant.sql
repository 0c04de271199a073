-- A grant clears the previous owner's blocked reason: the new owner records it again if
-- the message still fails.
UPDATE {p}leases
SET owner = $1, epoch = epoch + 1, expires_at = {now} + INTERVAL $2 * 1000 MICROSECOND,
    clean = FALSE, blocked_reason = NULL
WHERE partition_no = $3 AND epoch = $4
