-- Records `relay` as alive for `ttl`, forgets relays whose heartbeat ran out, and returns
-- how many are alive.
-- KEYS[1]: the live relays, a sorted set scored by expiry in ms.
-- ARGV: relay, ttl in ms.
local now = now_ms()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
