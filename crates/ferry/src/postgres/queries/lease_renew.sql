UPDATE {p}leases SET expires_at = now() + make_interval(secs => $4::float8 / 1000)
WHERE partition_no = $1 AND epoch = $2 AND owner = $3 AND expires_at > now()
