-- As the first migration creates it: one notification per producing statement and
-- partition, whoever inserted.
CREATE TRIGGER {p}outbox_notify AFTER INSERT ON {p}outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {p}notify()
