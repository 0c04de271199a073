UPDATE {p}service_messages SET version = $2 WHERE id = $1
