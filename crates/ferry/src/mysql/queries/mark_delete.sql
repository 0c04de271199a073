-- Marks go through the unique id index (forced: the planner may prefer a scan of the
-- partition), so they lock exactly the rows they mark. A scan would lock the gaps of the
-- partition and wait on producers' uncommitted rows there, while those producers insert
-- into the locked gaps: a deadlock.
DELETE o FROM {p}outbox AS o FORCE INDEX (outbox_id)
WHERE o.id IN ($2) AND o.partition_no = $1
