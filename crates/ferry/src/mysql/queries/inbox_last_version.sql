-- A locking read: the latest committed version, not the transaction's snapshot.
SELECT version FROM {p}inbox_versions
WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3
FOR UPDATE
