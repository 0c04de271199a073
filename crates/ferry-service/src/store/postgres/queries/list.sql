SELECT {list_cols} FROM {p}service_messages
WHERE ($1::jsonb = '[]'::jsonb OR status = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))))
  AND ($2::uuid IS NULL OR id > $2)
ORDER BY id LIMIT $3
