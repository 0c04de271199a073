SELECT l.partition_no,
       CASE WHEN l.expires_at > {now} THEN l.owner END AS owner,
       l.epoch,
       CASE WHEN l.expires_at > {now} THEN l.expires_at END AS expires_at_ms,
       l.blocked_reason,
       COALESCE(b.backlog, 0) AS backlog,
       b.oldest_age_secs
FROM {p}leases l LEFT JOIN (
    SELECT partition_no, COUNT(*) AS backlog,
           (julianday('now') - julianday(MIN(created_at))) * 86400.0 AS oldest_age_secs
    FROM {p}outbox WHERE published_at IS NULL GROUP BY partition_no
) b ON b.partition_no = l.partition_no
ORDER BY l.partition_no
