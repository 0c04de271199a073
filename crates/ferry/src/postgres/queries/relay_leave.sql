DELETE FROM {p}relays WHERE relay_id = $1
