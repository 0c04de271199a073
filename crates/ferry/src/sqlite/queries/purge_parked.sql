DELETE FROM {p}parked WHERE sequence IN (
    SELECT sequence FROM {p}parked WHERE parked_at < {now} - $1 LIMIT $2)
