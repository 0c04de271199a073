-- Only ever moves forward; a concurrent instance that advanced first makes it a no-op.
INSERT INTO {p}inbox_versions AS v (consumer, aggregate_type, aggregate_id, version)
VALUES ($1, $2, $3, $4)
ON CONFLICT (consumer, aggregate_type, aggregate_id)
DO UPDATE SET version = excluded.version WHERE v.version < excluded.version
