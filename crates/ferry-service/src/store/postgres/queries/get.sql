SELECT {cols} FROM {p}service_messages WHERE id = $1
