INSERT INTO {p}outbox (id, partition_no, aggregate_type, aggregate_id, version,
                       event_type, payload, headers, partition_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING sequence
