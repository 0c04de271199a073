UPDATE {p}inbox_versions SET version = $4
WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND version < $4
