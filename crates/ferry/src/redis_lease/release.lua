-- Gives a partition up and records how: `clean` (1/0) tells the next owner whether it
-- must reconcile. Changes nothing once the partition was granted again.
-- KEYS[1]: the epoch counter (names the slot the lease keys live in).
-- ARGV: key prefix, partition, '<epoch>:<owner>', epoch, clean.
local prefix, partition = ARGV[1], ARGV[2]
local now = now_ms()
local owner = prefix .. 'owner:' .. partition
local state = prefix .. 'state:' .. partition
if redis.call('GET', owner) == ARGV[3] then
  redis.call('DEL', owner)
end
if redis.call('HGET', state, 'epoch') ~= ARGV[4] then
  return 0
end
local expires = tonumber(redis.call('HGET', state, 'expires_ms') or now)
redis.call('HSET', state, 'clean', ARGV[5], 'expires_ms', math.min(expires, now))
return 1
