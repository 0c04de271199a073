-- With their original sequences: ahead of every later message of the aggregate.
INSERT INTO {p}outbox (sequence, id, partition_no, aggregate_type, aggregate_id, version,
                       event_type, payload, headers, partition_key, created_at)
OVERRIDING SYSTEM VALUE
SELECT sequence, id, partition_no, aggregate_type, aggregate_id, version, event_type,
       payload, headers, partition_key, created_at
FROM {p}parked WHERE aggregate_type = $1 AND aggregate_id = $2
ORDER BY sequence
