-- Published messages kept for replay, in sequence order (through the primary key).
SELECT sequence, id, partition_no,
       CONVERT(aggregate_type USING utf8mb4) AS aggregate_type,
       CONVERT(aggregate_id USING utf8mb4) AS aggregate_id,
       version, event_type, payload, headers, partition_key, created_at
FROM {p}outbox
WHERE published_at IS NOT NULL AND sequence BETWEEN $2 AND $3
  AND ($1 IS NULL OR partition_no = $1)
  AND ($4 IS NULL OR created_at >= TIMESTAMPADD(MICROSECOND, $4 * 1000, '1970-01-01 00:00:00'))
  AND ($5 IS NULL OR created_at <= TIMESTAMPADD(MICROSECOND, $5 * 1000, '1970-01-01 00:00:00'))
  AND ($6 IS NULL OR (aggregate_type = $6 AND aggregate_id = $7))
ORDER BY sequence LIMIT $8
