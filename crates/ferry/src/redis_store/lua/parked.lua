-- Parked messages in sequence order: all, or one aggregate's.
-- ARGV: key prefix, aggregate_type and aggregate_id ('' '' for all), after sequence
--   ('' for the start), limit.
-- Returns each message's fields: the message's own, then partition, parked_at (ms),
--   parked_by, reason, holds ('1'/'0').

local function main()
  local prefix, kind, id, after, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
  local index = prefix .. 'parked'
  if kind ~= '' then
    index = prefix .. 'parked_of:' .. aggregate_field(kind, id)
  end
  local from = after == '' and '-inf' or '(' .. after
  local rows = {}
  for _, parked_id in ipairs(redis.call('ZRANGEBYSCORE', index, from, '+inf', 'LIMIT', 0, limit)) do
    local fields = redis.call('HGETALL', prefix .. 'parked:' .. parked_id)
    if #fields > 0 then
      rows[#rows + 1] = fields
    end
  end
  return rows
end

return run(main)
