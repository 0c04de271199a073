UPDATE {p}leases
SET checkpoint = CASE WHEN $4 IS NULL OR (checkpoint IS NOT NULL AND checkpoint >= $4)
                      THEN checkpoint ELSE $4 END
WHERE partition_no = $1 AND {fence}
