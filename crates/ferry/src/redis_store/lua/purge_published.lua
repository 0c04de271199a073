-- Deletes up to `batch` published messages kept longer than `older than`, from every
-- partition's `done:<n>` stream and the `kept` index.
-- ARGV: key prefix, older than (ms), batch. Returns how many were deleted.

local function main()
  local prefix, older_than, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
  local partitions = outbox_partitions(prefix)
  -- Published streams take ids from the server's clock when a message is marked.
  local before = '(' .. int(now_ms() - older_than) .. '-0'
  local deleted = 0
  for partition = 0, partitions - 1 do
    if deleted >= batch then
      break
    end
    local published = prefix .. 'done:' .. partition
    local entries = redis.call('XRANGE', published, '-', before, 'COUNT', batch - deleted)
    if #entries > 0 then
      local ids, members = {}, {}
      for i, item in ipairs(entries) do
        ids[i] = item[1]
        members[i] = partition .. ' ' .. item[1]
      end
      redis.call('ZREM', prefix .. 'kept', unpack(members))
      deleted = deleted + redis.call('XDEL', published, unpack(ids))
    end
  end
  return deleted
end

return run(main)
