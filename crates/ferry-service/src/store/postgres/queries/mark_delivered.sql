-- A confirmed message is delivered once its outbox row is gone (deleted when marked) or
-- marked published (kept for retention). The confirmation and its outbox row commit
-- together, so a confirmed message without a pending row was published. The ack deadline
-- doubles with each delivery, up to $3.
UPDATE {p}service_messages
SET status = 'delivered', delivered_at = now(), updated_at = now(),
    ack_deadline = now() + make_interval(secs =>
        least($2::float8 * power(2, greatest(deliveries - 1, 0)), $3::float8) / 1000)
WHERE status = 'confirmed' AND id IN (
    SELECT m.id FROM {p}service_messages m
    WHERE m.status = 'confirmed' AND NOT EXISTS (
        SELECT 1 FROM {p}outbox o WHERE o.id = m.id AND o.published_at IS NULL)
    ORDER BY m.confirmed_at LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING id
