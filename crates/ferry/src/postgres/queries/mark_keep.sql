UPDATE {p}outbox SET published_at = now()
WHERE partition_no = $1 AND id = ANY($2) AND published_at IS NULL
