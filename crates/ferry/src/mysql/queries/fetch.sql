-- Names stored as VARBINARY are read as utf8mb4 text.
SELECT sequence, id, partition_no,
       CONVERT(aggregate_type USING utf8mb4) AS aggregate_type,
       CONVERT(aggregate_id USING utf8mb4) AS aggregate_id,
       version, event_type, payload, headers, partition_key, created_at
FROM {p}outbox
WHERE partition_no = $1 AND published_at IS NULL
ORDER BY sequence LIMIT $2
