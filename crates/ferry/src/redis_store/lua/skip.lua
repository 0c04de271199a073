-- An operator's skip: parks one unpublished message (holding nothing: its aggregate goes
-- on without it) and asks the relay of its partition, if blocked, to go on at once.
-- ARGV: key prefix, message id, parked by, reason.
-- Returns the parked message's fields (as `parked.lua` does), or nil when no unpublished
-- message has that id.

local function main()
  local prefix, id, by, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  local partition, stream, entry = locate(prefix, redis.call('HGET', prefix .. 'ids', id))
  if not partition then
    return nil
  end
  local item = redis.call('XRANGE', stream, entry, entry)[1]
  if not item then
    return nil
  end
  park_entry(prefix, stream, entry, item[2], partition, int(now_ms()), by, reason, '0')
  local lease = prefix .. 'lease:' .. partition
  if redis.call('HEXISTS', lease, 'blocked_reason') == 1 then
    redis.call('HSET', lease, 'retry', '1')
  end
  return redis.call('HGETALL', prefix .. 'parked:' .. id)
end

return run(main)
