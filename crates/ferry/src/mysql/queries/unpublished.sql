-- Through the unique id index, as in mark_delete.sql.
SELECT o.id FROM {p}outbox AS o FORCE INDEX (outbox_id)
WHERE o.id IN ($2) AND o.partition_no = $1 AND o.published_at IS NULL
