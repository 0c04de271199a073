-- Stored routines keep the sql_mode they were created under, so `enqueue` is strict (a
-- too long name is an error, never truncated) whatever the server's default or the
-- caller's session.
SET SESSION sql_mode =
    'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ZERO_IN_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION'
