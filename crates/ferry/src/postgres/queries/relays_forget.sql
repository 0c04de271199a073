DELETE FROM {p}relays WHERE expires_at < now() - interval '1 hour'
