-- Grants up to `max` free partitions to `relay`, starting at partition `first`.
-- KEYS[1]: the epoch counter.
-- ARGV: key prefix, relay, max, ttl in ms, partition count, first, epoch floor.
-- Returns one {partition, epoch, previous owner left cleanly (1/0), ms since its lease
-- ran out} per grant.
local prefix, relay = ARGV[1], ARGV[2]
local max, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local partitions, first, floor = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
-- Epochs must stay above every epoch the outbox store has adopted, even after this
-- counter was lost (a Redis restart without persistence).
if tonumber(redis.call('GET', KEYS[1]) or '0') < floor then
  redis.call('SET', KEYS[1], floor)
end
local granted = {}
for i = 0, partitions - 1 do
  if #granted >= max then
    break
  end
  local partition = (first + i) % partitions
  local owner = prefix .. 'owner:' .. partition
  if redis.call('EXISTS', owner) == 0 then
    local epoch = redis.call('INCR', KEYS[1])
    redis.call('SET', owner, epoch .. ':' .. relay, 'NX', 'PX', ttl)
    local state = prefix .. 'state:' .. partition
    local previous = redis.call('HMGET', state, 'expires_ms', 'clean')
    local clean = (not previous[1]) or previous[2] == '1'
    local since_expiry = 0
    if previous[1] then
      since_expiry = math.max(now - tonumber(previous[1]), 0)
    end
    redis.call('HSET', state, 'epoch', epoch, 'owner', relay, 'expires_ms', now + ttl, 'clean', '0')
    granted[#granted + 1] = { partition, epoch, clean and 1 or 0, since_expiry }
  end
end
return granted
