-- Records that `relay` is alive for `ttl` ms, forgets relays whose heartbeat expired, and
-- returns how many are alive.
-- ARGV: key prefix, relay, ttl (ms).

local function main()
  local relays = ARGV[1] .. 'relays'
  local now = now_ms()
  redis.call('ZADD', relays, int(now + tonumber(ARGV[3])), ARGV[2])
  redis.call('ZREMRANGEBYSCORE', relays, '-inf', int(now))
  return redis.call('ZCARD', relays)
end

return run(main)
