DELETE FROM {p}outbox WHERE id = $1 AND published_at IS NULL
