-- Makes sure the aggregate's row exists and locks it (a primary-key duplicate takes a
-- record lock only, no gap lock), so that instances of one consumer handling the same
-- aggregate queue here.
INSERT INTO {p}inbox_versions (consumer, aggregate_type, aggregate_id, version)
VALUES ($1, $2, $3, 0)
ON DUPLICATE KEY UPDATE version = version
