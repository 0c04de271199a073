DELETE FROM {p}outbox WHERE published_at < {now} - INTERVAL $1 * 1000 MICROSECOND LIMIT $2
