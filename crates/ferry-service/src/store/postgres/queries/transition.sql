-- `{target}` and `{assign}` come from the transition; $2 is a JSON array of the allowed
-- source statuses, turned into an array once: a condition on the row alone is re-checked
-- against the row another transaction just changed, where a join with the list would
-- keep the status it matched before.
UPDATE {p}service_messages
SET status = '{target}', updated_at = now(), reason = $3, {assign}
WHERE id = $1 AND status = ANY(ARRAY(SELECT jsonb_array_elements_text($2::jsonb)))
RETURNING {cols}
