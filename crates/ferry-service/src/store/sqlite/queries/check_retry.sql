UPDATE {p}service_messages
SET next_check_at = {now} + $3, reason = $4, updated_at = {now}
WHERE id = $1 AND status = 'prepared' AND checks = $2
