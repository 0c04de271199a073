-- Extends the leases `relay` still holds with the given epochs.
-- ARGV: key prefix, relay, ttl (ms), then partition and epoch pairs.
-- Returns the partitions extended.

local function main()
  local prefix, relay, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
  local now = now_ms()
  local renewed = {}
  for i = 4, #ARGV, 2 do
    local lease = prefix .. 'lease:' .. ARGV[i]
    local current = redis.call('HMGET', lease, 'owner', 'epoch', 'expires_at')
    if current[1] == relay and current[2] == ARGV[i + 1] and (tonumber(current[3]) or 0) > now then
      redis.call('HSET', lease, 'expires_at', int(now + ttl))
      renewed[#renewed + 1] = tonumber(ARGV[i])
    end
  end
  return renewed
end

return run(main)
