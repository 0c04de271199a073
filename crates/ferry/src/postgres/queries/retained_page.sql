-- Published messages kept for replay, in sequence order (through the primary key).
SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at
FROM {p}outbox
WHERE published_at IS NOT NULL AND sequence BETWEEN $2 AND $3
  AND ($1::int8 IS NULL OR partition_no = $1)
  AND ($4::int8 IS NULL OR created_at >= to_timestamp($4::float8 / 1000))
  AND ($5::int8 IS NULL OR created_at <= to_timestamp($5::float8 / 1000))
  AND ($6::text IS NULL OR (aggregate_type = $6 AND aggregate_id = $7))
ORDER BY sequence LIMIT $8
