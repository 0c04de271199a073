DELETE FROM {p}inbox WHERE (consumer, id) IN (
    SELECT consumer, id FROM {p}inbox
    WHERE processed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ($1 / 1000.0) || ' seconds')
    LIMIT $2)
