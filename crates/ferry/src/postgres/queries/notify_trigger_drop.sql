DROP TRIGGER IF EXISTS {p}outbox_notify ON {p}outbox
