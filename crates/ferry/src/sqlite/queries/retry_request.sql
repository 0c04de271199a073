UPDATE {p}leases SET retry_requested = 1
WHERE partition_no = $1 AND blocked_reason IS NOT NULL
