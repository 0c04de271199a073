-- Whether the outbox table has the trigger that wakes the relay (outbox.wake = "notify").
SELECT EXISTS (
    SELECT 1 FROM pg_trigger
    WHERE tgrelid = to_regclass('{p}outbox') AND tgname = '{p}outbox_notify'
) AS present
