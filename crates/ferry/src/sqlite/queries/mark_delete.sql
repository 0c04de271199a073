-- $2 is a JSON array of ids in hex: one prepared statement whatever the batch size.
DELETE FROM {p}outbox
WHERE partition_no = $1 AND id IN (SELECT unhex(value) FROM json_each($2))
