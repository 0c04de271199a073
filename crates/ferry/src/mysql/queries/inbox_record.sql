-- A duplicate key error (1062) means this consumer saw the id before; only this
-- statement is rolled back, not the consumer's transaction.
INSERT INTO {p}inbox (consumer, id, aggregate_type, aggregate_id, version, processed_at)
VALUES ($1, $2, $3, $4, $5, {now})
