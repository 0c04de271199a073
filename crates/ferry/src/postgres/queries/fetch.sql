SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at
FROM {p}outbox o
WHERE partition_no = $1 AND published_at IS NULL
  -- Messages of an aggregate a parked message holds wait until it is requeued.
  AND NOT EXISTS (SELECT 1 FROM {p}parked k WHERE k.holds_aggregate
                  AND k.aggregate_type = o.aggregate_type AND k.aggregate_id = o.aggregate_id)
ORDER BY sequence LIMIT $2
