UPDATE {p}leases SET retry_requested = true
WHERE partition_no = $1 AND blocked_reason IS NOT NULL
