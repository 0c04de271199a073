DELETE FROM {p}inbox WHERE (consumer, id) IN (
    SELECT consumer, id FROM {p}inbox
    WHERE processed_at < now() - make_interval(secs => $1::float8 / 1000)
    LIMIT $2)
