-- The fenced mark: removes published messages from their partition's streams, only while
-- the caller's lease is current (see `lease_is_current`).
-- ARGV: key prefix, partition, epoch, keep ('1': copy each message to the partition's
--   published stream for retention, indexed by sequence in `kept`), checkpoint ('' for
--   none), adopted owner ('' for the store's own leases), message ids...
-- Returns the number of messages removed, or -1 (fenced: nothing changed).

local CHUNK = 500

local function main()
  local prefix, partition, epoch = ARGV[1], ARGV[2], ARGV[3]
  local keep, checkpoint, adopted_by = ARGV[4] == '1', ARGV[5], ARGV[6]
  local lease = prefix .. 'lease:' .. partition
  if not lease_is_current(lease, epoch, adopted_by) then
    return -1
  end
  if checkpoint ~= '' then
    local previous = redis.call('HGET', lease, 'checkpoint')
    if not previous or greater(checkpoint, previous) then
      redis.call('HSET', lease, 'checkpoint', checkpoint)
    end
  end
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
      -- An id of another partition, parked, or marked already, is left alone.
      local owner, stream, entry = locate(prefix, location)
      if owner == partition then
        entries[stream] = entries[stream] or {}
        table.insert(entries[stream], entry)
        found[#found + 1] = chunk[i]
      end
    end
    for stream, list in pairs(entries) do
      if keep then
        for _, entry in ipairs(list) do
          local copy = redis.call('XRANGE', stream, entry, entry)[1]
          if copy then
            local kept = redis.call('XADD', published, '*', unpack(copy[2]))
            redis.call('ZADD', prefix .. 'kept', field_table(copy[2]).sequence, partition .. ' ' .. kept)
          end
        end
      end
      removed = removed + redis.call('XDEL', stream, unpack(list))
    end
    if #found > 0 then
      redis.call('HDEL', ids, unpack(found))
    end
  end
  return removed
end

return run(main)
