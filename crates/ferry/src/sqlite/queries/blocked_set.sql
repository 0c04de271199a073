-- Since when is kept while the same partition stays blocked.
UPDATE {p}leases
SET blocked_at = CASE WHEN $4 IS NULL THEN NULL
                      WHEN blocked_reason IS NULL THEN {now} ELSE blocked_at END,
    blocked_reason = $4
WHERE partition_no = $1 AND {fence}
