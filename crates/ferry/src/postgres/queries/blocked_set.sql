UPDATE {p}leases SET blocked_reason = $4 WHERE partition_no = $1 AND {fence}
