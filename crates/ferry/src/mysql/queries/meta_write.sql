INSERT INTO {p}meta (`key`, value) VALUES ($1, $2)
ON DUPLICATE KEY UPDATE value = VALUES(value)
