-- The write lock this takes is held until the producer's transaction ends, so a second
-- writer of the aggregate waits and gets the next version: version order is commit order.
INSERT INTO {p}aggregate_versions (aggregate_type, aggregate_id, version)
VALUES ($1, $2, 1)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = version + 1
RETURNING version
