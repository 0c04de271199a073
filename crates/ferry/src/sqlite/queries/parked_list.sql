SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at,
       parked_at AS parked_at_ms, parked_by, reason, holds_aggregate
FROM {p}parked
WHERE ($1 IS NULL OR (aggregate_type = $1 AND aggregate_id = $2)) AND sequence > $3
ORDER BY sequence LIMIT $4
