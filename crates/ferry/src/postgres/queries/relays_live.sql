SELECT count(*) AS live FROM {p}relays WHERE expires_at > now()
