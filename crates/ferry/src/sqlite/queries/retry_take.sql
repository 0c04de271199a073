UPDATE {p}leases SET retry_requested = 0
WHERE partition_no = $1 AND {fence} AND retry_requested
