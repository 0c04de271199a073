-- See the PostgreSQL statement. The doubling is capped at 2^20 so the product stays an
-- integer.
UPDATE {p}service_messages
SET status = 'delivered', delivered_at = {now}, updated_at = {now},
    ack_deadline = {now} + min($2 * (1 << min(max(deliveries - 1, 0), 20)), $3)
WHERE status = 'confirmed' AND id IN (
    SELECT m.id FROM {p}service_messages m
    WHERE m.status = 'confirmed' AND NOT EXISTS (
        SELECT 1 FROM {p}outbox o WHERE o.id = m.id AND o.published_at IS NULL)
    ORDER BY m.confirmed_at LIMIT $1)
RETURNING id
