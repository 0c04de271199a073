DELETE FROM {p}service_messages WHERE id IN (
    SELECT id FROM {p}service_messages
    WHERE status IN ('completed', 'cancelled') AND updated_at < {now} - $1
    LIMIT $2)
