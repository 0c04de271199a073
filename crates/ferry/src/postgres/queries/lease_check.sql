UPDATE {p}leases SET checkpoint = greatest(checkpoint, $4)
WHERE partition_no = $1 AND {fence}
