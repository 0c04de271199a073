SELECT count(*) AS count, min(sequence) AS first_sequence, max(sequence) AS last_sequence,
       (extract(epoch FROM min(created_at)) * 1000)::int8 AS first_created_at_ms,
       (extract(epoch FROM max(created_at)) * 1000)::int8 AS last_created_at_ms
FROM {p}outbox
WHERE published_at IS NOT NULL AND sequence BETWEEN $2 AND $3
  AND ($1::int8 IS NULL OR partition_no = $1)
  AND ($4::int8 IS NULL OR created_at >= to_timestamp($4::float8 / 1000))
  AND ($5::int8 IS NULL OR created_at <= to_timestamp($5::float8 / 1000))
  AND ($6::text IS NULL OR (aggregate_type = $6 AND aggregate_id = $7))
