SELECT l.partition_no,
       CASE WHEN l.expires_at > {now} THEN CONVERT(l.owner USING utf8mb4) END AS owner,
       l.epoch,
       CASE WHEN l.expires_at > {now} THEN
           CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', l.expires_at) DIV 1000 AS SIGNED)
       END AS expires_at_ms,
       l.blocked_reason,
       COALESCE(o.backlog, 0) AS backlog,
       TIMESTAMPDIFF(MICROSECOND, o.oldest, {now}) / 1e6 AS oldest_age_secs
FROM {p}leases l LEFT JOIN (
    SELECT partition_no, COUNT(*) AS backlog, MIN(created_at) AS oldest
    FROM {p}outbox WHERE published_at IS NULL GROUP BY partition_no
) o ON o.partition_no = l.partition_no
ORDER BY l.partition_no
