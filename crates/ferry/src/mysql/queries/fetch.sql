-- Names stored as VARBINARY are read as utf8mb4 text.
SELECT o.sequence, o.id, o.partition_no,
       CONVERT(o.aggregate_type USING utf8mb4) AS aggregate_type,
       CONVERT(o.aggregate_id USING utf8mb4) AS aggregate_id,
       o.version, o.event_type, o.payload, o.headers, o.partition_key, o.created_at
FROM {p}outbox o
WHERE o.partition_no = $1 AND o.published_at IS NULL
  -- Messages of an aggregate a parked message holds wait until it is requeued.
  AND NOT EXISTS (SELECT 1 FROM {p}parked k WHERE k.holds_aggregate
                  AND k.aggregate_type = o.aggregate_type AND k.aggregate_id = o.aggregate_id)
ORDER BY o.sequence LIMIT $2
