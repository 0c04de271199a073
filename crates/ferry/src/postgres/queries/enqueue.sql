-- The function `ferry migrate` installs for producers in any language.
SELECT message_id, message_version, message_partition, message_sequence
FROM {p}enqueue_bytes($1, $2, $3, $4, $5, $6, $7)
