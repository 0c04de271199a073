UPDATE {p}leases SET retry_requested = FALSE
WHERE partition_no = $1 AND {fence} AND retry_requested
