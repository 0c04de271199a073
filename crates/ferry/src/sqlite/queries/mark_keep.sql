UPDATE {p}outbox SET published_at = {now_text}
WHERE partition_no = $1 AND published_at IS NULL
  AND id IN (SELECT unhex(value) FROM json_each($2))
