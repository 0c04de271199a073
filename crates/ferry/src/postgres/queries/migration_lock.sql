-- Held until the migration's transaction ends.
SELECT true AS locked FROM pg_advisory_xact_lock(hashtext($1))
