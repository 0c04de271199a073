SELECT status, count(*) AS count,
       ({now} - min(coalesce(confirmed_at, created_at))) / 1000.0 AS oldest_age_secs
FROM {p}service_messages GROUP BY status
