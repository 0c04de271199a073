DELETE FROM {p}relays WHERE expires_at <= {now} - 3600000
