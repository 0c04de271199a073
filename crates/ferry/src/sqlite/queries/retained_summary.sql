SELECT count(*) AS count, min(sequence) AS first_sequence, max(sequence) AS last_sequence,
       CAST((julianday(min(created_at)) - 2440587.5) * 86400000 AS INTEGER) AS first_created_at_ms,
       CAST((julianday(max(created_at)) - 2440587.5) * 86400000 AS INTEGER) AS last_created_at_ms
FROM {p}outbox
WHERE published_at IS NOT NULL AND sequence BETWEEN $2 AND $3
  AND ($1 IS NULL OR partition_no = $1)
  AND ($4 IS NULL OR created_at >= strftime('%Y-%m-%dT%H:%M:%fZ', $4 / 1000.0, 'unixepoch'))
  AND ($5 IS NULL OR created_at <= strftime('%Y-%m-%dT%H:%M:%fZ', $5 / 1000.0, 'unixepoch'))
  AND ($6 IS NULL OR (aggregate_type = $6 AND aggregate_id = $7))
