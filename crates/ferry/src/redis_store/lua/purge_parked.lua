-- Deletes up to `batch` messages parked longer than `older than`. An aggregate whose last
-- holding message goes is released: its waiting messages flow again (its partition is
-- woken).
-- ARGV: key prefix, older than (ms), batch. Returns how many were deleted.

local function main()
  local prefix, older_than, batch = ARGV[1], tonumber(ARGV[2]), ARGV[3]
  local before = '(' .. int(now_ms() - older_than)
  local parked_ids = redis.call('ZRANGEBYSCORE', prefix .. 'parked_at', '-inf', before, 'LIMIT', 0, batch)
  local woken = {}
  for _, parked_id in ipairs(parked_ids) do
    local key = prefix .. 'parked:' .. parked_id
    local m = redis.call('HMGET', key, 'aggregate_type', 'aggregate_id', 'partition', 'holds')
    redis.call('DEL', key)
    redis.call('ZREM', prefix .. 'parked', parked_id)
    redis.call('ZREM', prefix .. 'parked_at', parked_id)
    redis.call('HDEL', prefix .. 'ids', parked_id)
    if m[1] then
      local field = aggregate_field(m[1], m[2])
      redis.call('ZREM', prefix .. 'parked_of:' .. field, parked_id)
      if m[4] == '1' and redis.call('HINCRBY', prefix .. 'holds', field, -1) <= 0 then
        redis.call('HDEL', prefix .. 'holds', field)
        woken[#woken + 1] = m[3]
      end
    end
  end
  wake_partitions(prefix, woken)
  return #parked_ids
end

return run(main)
