INSERT INTO {p}parked (sequence, id, partition_no, aggregate_type, aggregate_id, version,
                       event_type, payload, headers, partition_key, created_at,
                       parked_at, parked_by, reason, holds_aggregate)
SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at, {now}, $4, $5, TRUE
FROM {p}outbox
WHERE partition_no = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND published_at IS NULL
