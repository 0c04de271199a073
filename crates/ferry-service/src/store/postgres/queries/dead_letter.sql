UPDATE {p}service_messages
SET status = 'dead_lettered', ack_deadline = NULL, updated_at = now(), reason = $3
WHERE status = 'delivered' AND id IN (
    SELECT id FROM {p}service_messages
    WHERE status = 'delivered' AND ack_deadline <= now() AND deliveries >= $1
    ORDER BY ack_deadline LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING id
