-- A fetch while some aggregates are held by parked messages (`holds`): the first `limit`
-- entries of `front:<n>`, and of `p:<n>` those whose aggregate is not held, read together
-- so that a requeue cannot fall between them (it releases an aggregate and fills
-- `front:<n>` in one step). Requeued messages never belong to a held aggregate: parking
-- takes them out of `front:<n>`.
-- ARGV: key prefix, partition, limit. Returns {front entries, stream entries}, each as
--   XRANGE gives them.

local function main()
  local prefix, partition, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
  local stream = prefix .. 'p:' .. partition
  local holds = prefix .. 'holds'
  local held = {}
  local found = {}
  local start = '-'
  local page_size = math.max(limit, 100)
  while #found < limit do
    local page = redis.call('XRANGE', stream, start, '+', 'COUNT', page_size)
    for _, item in ipairs(page) do
      local m = field_table(item[2])
      local field = aggregate_field(m.aggregate_type, m.aggregate_id)
      if held[field] == nil then
        held[field] = redis.call('HEXISTS', holds, field) == 1
      end
      if not held[field] and #found < limit then
        found[#found + 1] = item
      end
    end
    if #page < page_size then
      break
    end
    start = '(' .. page[#page][1]
  end
  return {redis.call('XRANGE', prefix .. 'front:' .. partition, '-', '+', 'COUNT', limit), found}
end

return run(main)
