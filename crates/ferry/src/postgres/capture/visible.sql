-- ($1 xid, 32 bits as the replication protocol sends it) → whether a snapshot taken now
-- sees the transaction as completed, and that snapshot's xmin and xmax (every id below
-- xmin had ended). The 64-bit id is the one at or below the snapshot's xmax with those low
-- 32 bits; an id at or past xmax has not completed.
WITH now AS (
  SELECT snapshot,
    pg_snapshot_xmin(snapshot)::text::bigint AS xmin,
    pg_snapshot_xmax(snapshot)::text::bigint AS xmax
  FROM pg_current_snapshot() AS snapshot
), behind AS (
  SELECT snapshot, xmin, xmax, ((xmax % 4294967296) - $1 + 4294967296) % 4294967296 AS distance
  FROM now
)
SELECT distance > 0 AND distance < 2147483648
  AND pg_visible_in_snapshot((xmax - distance)::text::xid8, snapshot),
  xmin, xmax
FROM behind
