SELECT l.partition_no,
       CASE WHEN l.expires_at > now() THEN l.owner END AS owner,
       l.epoch,
       CASE WHEN l.expires_at > now()
            THEN (extract(epoch FROM l.expires_at) * 1000)::int8 END AS expires_at_ms,
       l.blocked_reason,
       coalesce(o.backlog, 0)::int8 AS backlog,
       extract(epoch FROM now() - o.oldest)::float8 AS oldest_age_secs
FROM {p}leases l LEFT JOIN (
    SELECT partition_no, count(*) AS backlog, min(created_at) AS oldest
    FROM {p}outbox WHERE published_at IS NULL GROUP BY partition_no
) o USING (partition_no)
ORDER BY l.partition_no
