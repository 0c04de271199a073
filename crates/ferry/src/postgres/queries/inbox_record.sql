INSERT INTO {p}inbox (consumer, id, aggregate_type, aggregate_id, version)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
