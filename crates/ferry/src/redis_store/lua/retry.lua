-- Operators' retry requests for blocked partitions, kept in the lease hash (`retry`).
-- ARGV: key prefix, partition, mode: 'request' (only if the partition is blocked; returns
--   1 if it was) or 'take' (then epoch and adopted owner, '' for the store's own leases:
--   the current owner takes the request; returns 1 once per request).

local function main()
  local prefix, partition, mode = ARGV[1], ARGV[2], ARGV[3]
  local lease = prefix .. 'lease:' .. partition
  if mode == 'request' then
    if redis.call('HEXISTS', lease, 'blocked_reason') == 0 then
      return 0
    end
    redis.call('HSET', lease, 'retry', '1')
    return 1
  end
  if not lease_is_current(lease, ARGV[4], ARGV[5]) then
    return 0
  end
  return redis.call('HDEL', lease, 'retry')
end

return run(main)
