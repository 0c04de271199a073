-- Through the unique id index, as in mark_delete.sql. A locking read: MariaDB writes a
-- transaction to the binlog before InnoDB makes its rows visible, so a plain read of a
-- streamed transaction's ids could miss them; this one waits for the inserting
-- transaction's row locks and reads the latest committed rows.
SELECT o.id FROM {p}outbox AS o FORCE INDEX (outbox_id)
WHERE o.id IN ($2) AND o.partition_no = $1 AND o.published_at IS NULL
LOCK IN SHARE MODE
