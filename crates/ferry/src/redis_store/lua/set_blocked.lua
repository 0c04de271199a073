-- Records (or, without a reason, clears) why a partition cannot move, and since when (kept
-- while it stays blocked), while the epoch is current. ARGV: key prefix, partition, epoch,
-- [reason].

local function main()
  local lease = ARGV[1] .. 'lease:' .. ARGV[2]
  if redis.call('HGET', lease, 'epoch') ~= ARGV[3] then
    return 0
  end
  if ARGV[4] then
    if redis.call('HEXISTS', lease, 'blocked_reason') == 0 then
      redis.call('HSET', lease, 'blocked_at', int(now_ms()))
    end
    redis.call('HSET', lease, 'blocked_reason', ARGV[4])
  else
    redis.call('HDEL', lease, 'blocked_reason', 'blocked_at', 'retry')
  end
  return 1
end

return run(main)
