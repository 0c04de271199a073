SELECT id FROM {p}outbox
WHERE partition_no = $1 AND published_at IS NULL
  AND id IN (SELECT unhex(value) FROM json_each($2))
