DELETE FROM {p}relays WHERE expires_at < {now} - INTERVAL 1 HOUR
