DELETE FROM {p}outbox WHERE sequence IN (
    SELECT sequence FROM {p}outbox
    WHERE published_at IS NOT NULL
      AND published_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ($1 / 1000.0) || ' seconds')
    LIMIT $2)
