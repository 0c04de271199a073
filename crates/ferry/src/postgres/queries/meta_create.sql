CREATE TABLE IF NOT EXISTS {p}meta (key text PRIMARY KEY, value text NOT NULL)
