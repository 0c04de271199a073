-- Only ever moves forward, even if the caller's check were skipped.
INSERT INTO {p}inbox_versions (consumer, aggregate_type, aggregate_id, version)
VALUES ($1, $2, $3, $4)
ON CONFLICT (consumer, aggregate_type, aggregate_id)
DO UPDATE SET version = excluded.version WHERE excluded.version > version
