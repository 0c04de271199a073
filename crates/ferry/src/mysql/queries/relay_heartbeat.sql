INSERT INTO {p}relays (relay_id, expires_at)
VALUES ($1, {now} + INTERVAL $2 * 1000 MICROSECOND)
ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)
