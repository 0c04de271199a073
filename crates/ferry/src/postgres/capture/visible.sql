-- The snapshot a query taken now would see: its xmax and the ids running at it, as 64-bit
-- numbers. A transaction below xmax and not running had completed when it was taken.
SELECT pg_snapshot_xmax(snapshot)::text::bigint,
  ARRAY(SELECT running::text::bigint FROM pg_snapshot_xip(snapshot) AS running)
FROM pg_current_snapshot() AS snapshot
