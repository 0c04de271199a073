UPDATE {p}service_messages
SET status = 'confirmed', deliveries = deliveries + 1, attempts = attempts + 1,
    delivered_at = NULL, ack_deadline = NULL, updated_at = now(),
    reason = 'redelivered: not acknowledged in time'
WHERE status = 'delivered' AND id IN (
    SELECT id FROM {p}service_messages
    WHERE status = 'delivered' AND ack_deadline <= now() AND deliveries < $1
    ORDER BY ack_deadline LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING {cols}
