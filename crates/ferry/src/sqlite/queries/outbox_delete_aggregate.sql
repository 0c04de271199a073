DELETE FROM {p}outbox
WHERE partition_no = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND published_at IS NULL
