-- Deletes published messages kept longer than the retention, from every partition.
-- ARGV: key prefix, retention (ms). Returns how many were deleted.

local function main()
  local prefix = ARGV[1]
  local partitions = outbox_partitions(prefix)
  -- Published streams take ids from the server's clock when a message is marked.
  local before = int(now_ms() - tonumber(ARGV[2])) .. '-0'
  local deleted = 0
  for partition = 0, partitions - 1 do
    deleted = deleted + redis.call('XTRIM', prefix .. 'done:' .. partition, 'MINID', before)
  end
  return deleted
end

return run(main)
