-- `{target}` and `{assign}` come from the transition; $2 is a JSON array of the allowed
-- source statuses.
UPDATE {p}service_messages
SET status = '{target}', updated_at = {now}, reason = $3, {assign}
WHERE id = $1 AND status IN (SELECT value FROM json_each($2))
RETURNING {cols}
