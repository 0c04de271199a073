-- Through the unique id index, as in mark_delete.sql.
UPDATE {p}outbox FORCE INDEX (outbox_id) SET published_at = {now}
WHERE id IN ($2) AND partition_no = $1 AND published_at IS NULL
