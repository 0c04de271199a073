-- The numbers 0 to $1 - 1, from the ordinals of a JSON array of that length.
INSERT IGNORE INTO {p}leases (partition_no)
SELECT numbers.n - 1
FROM JSON_TABLE(CONCAT('[', REPEAT('0,', $1 - 1), '0]'), '$[*]' COLUMNS (n FOR ORDINALITY)) AS numbers
