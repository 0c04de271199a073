-- Gives a partition up, if the epoch is still current; `clean` ('1'/'0') says whether every
-- message published under it was marked, so that the next owner need not reconcile.
-- ARGV: key prefix, partition, epoch, clean.

local function main()
  local lease = ARGV[1] .. 'lease:' .. ARGV[2]
  local current = redis.call('HMGET', lease, 'epoch', 'expires_at')
  if current[1] ~= ARGV[3] then
    return 0
  end
  local expires_at = math.min(tonumber(current[2]) or 0, now_ms())
  redis.call('HSET', lease, 'owner', '', 'expires_at', int(expires_at), 'clean', ARGV[4])
  return 1
end

return run(main)
