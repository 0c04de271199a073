DELETE FROM {p}outbox WHERE sequence IN (
    SELECT sequence FROM {p}outbox
    WHERE published_at < now() - make_interval(secs => $1::float8 / 1000)
    LIMIT $2)
