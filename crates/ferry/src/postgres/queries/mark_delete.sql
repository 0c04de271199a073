DELETE FROM {p}outbox WHERE partition_no = $1 AND id = ANY($2)
