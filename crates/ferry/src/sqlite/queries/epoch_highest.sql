SELECT COALESCE(MAX(epoch), 0) AS epoch FROM {p}leases
