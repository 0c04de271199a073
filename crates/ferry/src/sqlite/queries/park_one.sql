INSERT INTO {p}parked (sequence, id, partition_no, aggregate_type, aggregate_id, version,
                       event_type, payload, headers, partition_key, created_at,
                       parked_at, parked_by, reason, holds_aggregate)
SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at, {now}, $2, $3, 0
FROM {p}outbox WHERE id = $1 AND published_at IS NULL
