INSERT INTO {p}outbox (id, partition_no, aggregate_type, aggregate_id, version,
                       event_type, payload, headers, partition_key, created_at)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, {now} FROM DUAL
WHERE NOT EXISTS (SELECT 1 FROM {p}outbox WHERE id = $1)
