UPDATE {p}service_messages
SET status = 'check_failed', next_check_at = NULL, reason = $3, updated_at = now()
WHERE id = $1 AND status = 'prepared' AND checks = $2
