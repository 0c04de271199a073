-- A new epoch clears the previous owner's blocked reason: the new owner records it
-- again if the message still fails.
UPDATE {p}leases
SET blocked_reason = CASE WHEN epoch = $2 THEN blocked_reason END, owner = $3, epoch = $2
WHERE partition_no = $1 AND (epoch < $2 OR (epoch = $2 AND owner = $3))
