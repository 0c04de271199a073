SELECT coalesce(max(epoch), 0)::int8 AS epoch FROM {p}leases
