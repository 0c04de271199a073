-- The fenced mark: removes published messages from their partition's stream, only while
-- the caller's lease epoch is current and unexpired on the server's clock or, for a lease
-- adopted from an outside backend, while its epoch and owner are the adopted ones.
-- ARGV: key prefix, partition, epoch, keep ('1': copy each message to the partition's
--   published stream for retention), checkpoint ('' for none), adopted owner ('' for the
--   store's own leases), message ids...
-- Returns the number of messages removed, or -1 (fenced: nothing changed).

local CHUNK = 500

local function main()
  local prefix, partition, epoch = ARGV[1], ARGV[2], ARGV[3]
  local keep, checkpoint, adopted_by = ARGV[4] == '1', ARGV[5], ARGV[6]
  local lease = prefix .. 'lease:' .. partition
  local current = redis.call('HMGET', lease, 'epoch', 'expires_at', 'owner')
  if current[1] ~= epoch then
    return -1
  end
  if adopted_by == '' and (tonumber(current[2]) or 0) <= now_ms() then
    return -1
  end
  if adopted_by ~= '' and current[3] ~= adopted_by then
    return -1
  end
  if checkpoint ~= '' then
    local previous = redis.call('HGET', lease, 'checkpoint')
    if not previous or greater(checkpoint, previous) then
      redis.call('HSET', lease, 'checkpoint', checkpoint)
    end
  end
  local stream = prefix .. 'p:' .. partition
  local published = prefix .. 'done:' .. partition
  local ids = prefix .. 'ids'
  local removed = 0
  for first = 7, #ARGV, CHUNK do
    local chunk = {}
    for i = first, math.min(first + CHUNK - 1, #ARGV) do
      chunk[#chunk + 1] = ARGV[i]
    end
    local locations = redis.call('HMGET', ids, unpack(chunk))
    local entries, found = {}, {}
    for i, location in ipairs(locations) do
      -- An id of another partition, or marked already, is left alone.
      local owner, entry = string.match(location or '', '^(%d+) (.+)$')
      if owner == partition then
        entries[#entries + 1] = entry
        found[#found + 1] = chunk[i]
      end
    end
    if #entries > 0 then
      if keep then
        for _, entry in ipairs(entries) do
          local copy = redis.call('XRANGE', stream, entry, entry)[1]
          if copy then
            redis.call('XADD', published, '*', unpack(copy[2]))
          end
        end
      end
      removed = removed + redis.call('XDEL', stream, unpack(entries))
      redis.call('HDEL', ids, unpack(found))
    end
  end
  return removed
end

return run(main)
