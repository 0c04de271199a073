INSERT INTO {p}relays (relay_id, expires_at)
VALUES ($1, now() + make_interval(secs => $2::float8 / 1000))
ON CONFLICT (relay_id) DO UPDATE SET expires_at = excluded.expires_at
