-- Counts the check and pushes next_check_at past the claim; the write transaction keeps
-- other instances out meanwhile.
UPDATE {p}service_messages
SET checks = checks + 1, next_check_at = {now} + $2, updated_at = {now}
WHERE status = 'prepared' AND id IN (
    SELECT id FROM {p}service_messages WHERE status = 'prepared' AND next_check_at <= {now}
    ORDER BY next_check_at LIMIT $1)
RETURNING id, check_url, checks
