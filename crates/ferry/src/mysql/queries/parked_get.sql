SELECT sequence, id, partition_no,
       CONVERT(aggregate_type USING utf8mb4) AS aggregate_type,
       CONVERT(aggregate_id USING utf8mb4) AS aggregate_id,
       version, event_type, payload, headers, partition_key, created_at,
       CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', parked_at) DIV 1000 AS SIGNED)
           AS parked_at_ms,
       parked_by, reason, holds_aggregate
FROM {p}parked WHERE id = $1
