-- A new epoch clears the previous owner's blocked reason, as a grant does. Assignments
-- run left to right, so the reason is decided on the old epoch.
UPDATE {p}leases
SET blocked_reason = CASE WHEN epoch = $2 THEN blocked_reason END, owner = $3, epoch = $2
WHERE partition_no = $1 AND (epoch < $2 OR (epoch = $2 AND owner = $3))
