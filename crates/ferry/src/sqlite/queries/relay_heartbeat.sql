INSERT INTO {p}relays (relay_id, expires_at) VALUES ($1, {now} + $2)
ON CONFLICT (relay_id) DO UPDATE SET expires_at = excluded.expires_at
