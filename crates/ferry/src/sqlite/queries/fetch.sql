SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at
FROM {p}outbox
WHERE partition_no = $1 AND published_at IS NULL
ORDER BY sequence LIMIT $2
