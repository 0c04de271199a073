-- The connection reports matched rows (CLIENT_FOUND_ROWS), so an unchanged checkpoint
-- still counts as held.
UPDATE {p}leases SET checkpoint = COALESCE(GREATEST(checkpoint, $4), checkpoint, $4)
WHERE partition_no = $1 AND {fence}
