UPDATE {p}service_messages
SET next_check_at = now() + make_interval(secs => $3::float8 / 1000), reason = $4, updated_at = now()
WHERE id = $1 AND status = 'prepared' AND checks = $2
