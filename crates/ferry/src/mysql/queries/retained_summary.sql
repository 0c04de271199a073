SELECT COUNT(*) AS count, MIN(sequence) AS first_sequence, MAX(sequence) AS last_sequence,
       CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', MIN(created_at)) DIV 1000 AS SIGNED)
           AS first_created_at_ms,
       CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', MAX(created_at)) DIV 1000 AS SIGNED)
           AS last_created_at_ms
FROM {p}outbox
WHERE published_at IS NOT NULL AND sequence BETWEEN $2 AND $3
  AND ($1 IS NULL OR partition_no = $1)
  AND ($4 IS NULL OR created_at >= TIMESTAMPADD(MICROSECOND, $4 * 1000, '1970-01-01 00:00:00'))
  AND ($5 IS NULL OR created_at <= TIMESTAMPADD(MICROSECOND, $5 * 1000, '1970-01-01 00:00:00'))
  AND ($6 IS NULL OR (aggregate_type = $6 AND aggregate_id = $7))
