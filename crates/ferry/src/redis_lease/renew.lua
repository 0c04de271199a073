-- Extends the leases still held as granted; returns their partitions.
-- KEYS[1]: the epoch counter (names the slot the lease keys live in).
-- ARGV: key prefix, ttl in ms, then per lease: partition, '<epoch>:<owner>'.
local prefix, ttl = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local renewed = {}
for i = 3, #ARGV, 2 do
  local owner = prefix .. 'owner:' .. ARGV[i]
  if redis.call('GET', owner) == ARGV[i + 1] then
    redis.call('PEXPIRE', owner, ttl)
    redis.call('HSET', prefix .. 'state:' .. ARGV[i], 'expires_ms', now + ttl)
    renewed[#renewed + 1] = tonumber(ARGV[i])
  end
end
return renewed
