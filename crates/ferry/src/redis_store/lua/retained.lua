-- Published messages kept for replay, through the `kept` index (sequence → '<partition>
-- <entry>' of `done:<partition>`), in sequence order. One call looks at up to `budget`
-- index entries, so that a selective filter over many kept messages does not hold Redis
-- for long; the caller calls again from where it got to.
-- ARGV: key prefix, mode ('page' or 'summary'), partition ('' for any), first sequence,
--   last sequence, created at or after (ms, '' for any), created at or before (ms, ''),
--   aggregate_type and aggregate_id ('' '' for any), budget, limit (page mode).
-- Returns {last sequence looked at ('' if none), 1 if the index ended, then: page mode,
--   {partition, fields} per message; summary mode, count, first and last sequence,
--   earliest and latest created_at ('' for none)}.

local function main()
  local prefix, mode, partition = ARGV[1], ARGV[2], ARGV[3]
  local first, last = ARGV[4], ARGV[5]
  local since, till = tonumber(ARGV[6]), tonumber(ARGV[7])
  local kind, id = ARGV[8], ARGV[9]
  local budget, limit = tonumber(ARGV[10]), tonumber(ARGV[11])
  local index = redis.call('ZRANGEBYSCORE', prefix .. 'kept', first, last, 'WITHSCORES', 'LIMIT', 0, budget)
  local looked_at = ''
  local page = {}
  local count, low, high, earliest, latest = 0, '', '', nil, nil
  for i = 1, #index, 2 do
    local member, sequence = index[i], int(tonumber(index[i + 1]))
    local owner, entry = string.match(member, '^(%d+) (.+)$')
    if partition == '' or owner == partition then
      local item = redis.call('XRANGE', prefix .. 'done:' .. owner, entry, entry)[1]
      local m = item and field_table(item[2])
      local created = m and tonumber(m.created_at)
      if m and (not since or created >= since) and (not till or created <= till)
        and (kind == '' or (m.aggregate_type == kind and m.aggregate_id == id)) then
        if mode == 'page' then
          page[#page + 1] = {owner, item[2]}
        else
          count = count + 1
          if low == '' then
            low = sequence
          end
          high = sequence
          earliest = math.min(earliest or created, created)
          latest = math.max(latest or created, created)
        end
      end
    end
    looked_at = sequence
    if mode == 'page' and #page >= limit then
      return {looked_at, 0, page}
    end
  end
  local ended = #index < 2 * budget and 1 or 0
  if mode == 'page' then
    return {looked_at, ended, page}
  end
  return {looked_at, ended, count, low, high, earliest and int(earliest) or '', latest and int(latest) or ''}
end

return run(main)
