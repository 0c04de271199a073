INSERT INTO {p}leases (partition_no) SELECT generate_series(0, $1 - 1)
ON CONFLICT (partition_no) DO NOTHING
