UPDATE {p}leases SET owner = NULL, expires_at = least(expires_at, now()), clean = $4
WHERE partition_no = $1 AND epoch = $2 AND owner = $3
