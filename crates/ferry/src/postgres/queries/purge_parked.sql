DELETE FROM {p}parked WHERE sequence IN (
    SELECT sequence FROM {p}parked
    WHERE parked_at < now() - make_interval(secs => $1::float8 / 1000)
    LIMIT $2)
