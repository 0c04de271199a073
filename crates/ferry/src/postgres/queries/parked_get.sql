SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at,
       (extract(epoch FROM parked_at) * 1000)::int8 AS parked_at_ms, parked_by, reason,
       holds_aggregate
FROM {p}parked WHERE id = $1
