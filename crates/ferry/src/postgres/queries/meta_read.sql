SELECT value FROM {p}meta WHERE key = $1
