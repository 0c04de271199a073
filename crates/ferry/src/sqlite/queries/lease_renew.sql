UPDATE {p}leases SET expires_at = {now} + $4
WHERE partition_no = $1 AND epoch = $2 AND owner = $3 AND expires_at > {now}
