SELECT id FROM {p}outbox
WHERE partition_no = $1 AND id = ANY($2) AND published_at IS NULL
