WITH RECURSIVE n(partition_no) AS
    (SELECT 0 UNION ALL SELECT partition_no + 1 FROM n WHERE partition_no + 1 < $1)
INSERT OR IGNORE INTO {p}leases (partition_no) SELECT partition_no FROM n
