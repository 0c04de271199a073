-- Grants up to `max` partitions whose lease is free or expired, each with its epoch + 1.
-- ARGV: key prefix, relay, max, ttl (ms), first partition to look at.
-- Returns {partition, epoch, previous owner left cleanly (1/0), ms since its lease
--   expired, its checkpoint or ''} per grant.

local function main()
  local prefix, relay = ARGV[1], ARGV[2]
  local max, ttl, start = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local partitions = outbox_partitions(prefix)
  local now = now_ms()
  local granted = {}
  for i = 0, partitions - 1 do
    if #granted >= max then
      break
    end
    local partition = (start + i) % partitions
    local lease = prefix .. 'lease:' .. partition
    local old = redis.call('HMGET', lease, 'owner', 'expires_at', 'clean', 'checkpoint')
    local owner, expires_at = old[1] or '', tonumber(old[2]) or 0
    if owner == '' or expires_at <= now then
      local epoch = redis.call('HINCRBY', lease, 'epoch', 1)
      redis.call('HSET', lease, 'owner', relay, 'expires_at', int(now + ttl), 'clean', '0')
      -- Clean only if released by an owner that marked all it published (or never granted).
      local clean = owner == '' and old[3] ~= '0'
      granted[#granted + 1] = {partition, epoch, clean and 1 or 0, math.max(now - expires_at, 0), old[4] or ''}
    end
  end
  return granted
end

return run(main)
