DELETE FROM {p}inbox WHERE processed_at < {now} - INTERVAL $1 * 1000 MICROSECOND LIMIT $2
