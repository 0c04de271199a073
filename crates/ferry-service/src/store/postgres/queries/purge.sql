DELETE FROM {p}service_messages WHERE id IN (
    SELECT id FROM {p}service_messages
    WHERE status IN ('completed', 'cancelled')
      AND updated_at < now() - make_interval(secs => $1::float8 / 1000)
    LIMIT $2)
