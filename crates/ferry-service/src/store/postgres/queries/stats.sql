SELECT status, count(*) AS count,
       extract(epoch FROM now() - min(coalesce(confirmed_at, created_at)))::float8 AS oldest_age_secs
FROM {p}service_messages GROUP BY status
