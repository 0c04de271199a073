SELECT {list_cols} FROM {p}service_messages
WHERE ($1 = '[]' OR status IN (SELECT value FROM json_each($1)))
  AND ($2 IS NULL OR id > $2)
ORDER BY id LIMIT $3
