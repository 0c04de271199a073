DELETE FROM {p}parked WHERE aggregate_type = $1 AND aggregate_id = $2
