-- Concurrent migrations queue here for up to 60 s. The lock is the session's and goes
-- with the migration's connection.
SELECT COALESCE(GET_LOCK($1, 60), 0) = 1 AS locked
