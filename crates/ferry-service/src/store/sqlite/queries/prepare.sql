INSERT INTO {p}service_messages (id, status, aggregate_type, aggregate_id, event_type,
                                payload, headers, partition_key, check_url, created_at,
                                updated_at, next_check_at)
VALUES ($1, 'prepared', $2, $3, $4, $5, $6, $7, $8, {now}, {now}, {now} + $9)
ON CONFLICT (id) DO NOTHING
RETURNING {cols}
