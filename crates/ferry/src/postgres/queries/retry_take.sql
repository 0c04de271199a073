UPDATE {p}leases SET retry_requested = false
WHERE partition_no = $1 AND {fence} AND retry_requested
