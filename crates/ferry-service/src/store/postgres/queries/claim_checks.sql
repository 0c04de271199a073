-- Counts the check and pushes next_check_at past the claim, so that no other instance
-- takes the row while this one asks the producer.
UPDATE {p}service_messages
SET checks = checks + 1, next_check_at = now() + make_interval(secs => $2::float8 / 1000),
    updated_at = now()
WHERE status = 'prepared' AND id IN (
    SELECT id FROM {p}service_messages WHERE status = 'prepared' AND next_check_at <= now()
    ORDER BY next_check_at LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING id, check_url, checks::int8 AS checks
