-- Puts an aggregate's parked messages back, with their original fields (id, version,
-- sequence), into their partitions' `front:<n>` streams, which fetches merge with `p:<n>`
-- by sequence: each goes out at its sequence's place, ahead of every later message of the
-- aggregate. A front stream is rewritten in sequence order (it holds only requeued
-- messages not yet published). Releases the aggregate and wakes the partitions.
-- ARGV: key prefix, aggregate_type, aggregate_id. Returns how many went back.

local function by_sequence(a, b)
  return tonumber(a.sequence) < tonumber(b.sequence)
end

local function main()
  local prefix, kind, id = ARGV[1], ARGV[2], ARGV[3]
  local field = aggregate_field(kind, id)
  local of_aggregate = prefix .. 'parked_of:' .. field
  local parked_ids = redis.call('ZRANGE', of_aggregate, 0, -1)
  local back = {}
  for _, parked_id in ipairs(parked_ids) do
    local fields = redis.call('HGETALL', prefix .. 'parked:' .. parked_id)
    if #fields > 0 then
      local m = field_table(fields)
      back[m.partition] = back[m.partition] or {}
      table.insert(back[m.partition], {sequence = m.sequence, fields = fields})
    end
  end
  local ids = prefix .. 'ids'
  local woken = {}
  for partition, messages in pairs(back) do
    local front = prefix .. 'front:' .. partition
    for _, item in ipairs(redis.call('XRANGE', front, '-', '+')) do
      table.insert(messages, {sequence = field_table(item[2]).sequence, fields = item[2]})
    end
    table.sort(messages, by_sequence)
    redis.call('DEL', front)
    for _, message in ipairs(messages) do
      local fields = {}
      for i = 1, #message.fields, 2 do
        local name = message.fields[i]
        -- The parked record's own fields stay behind.
        if name ~= 'partition' and name ~= 'parked_at' and name ~= 'parked_by'
          and name ~= 'reason' and name ~= 'holds' then
          fields[#fields + 1] = name
          fields[#fields + 1] = message.fields[i + 1]
        end
      end
      local entry = redis.call('XADD', front, '*', unpack(fields))
      redis.call('HSET', ids, field_table(fields).id, partition .. ' f' .. entry)
    end
    woken[#woken + 1] = partition
  end
  for _, parked_id in ipairs(parked_ids) do
    redis.call('DEL', prefix .. 'parked:' .. parked_id)
    redis.call('ZREM', prefix .. 'parked', parked_id)
    redis.call('ZREM', prefix .. 'parked_at', parked_id)
  end
  redis.call('DEL', of_aggregate)
  redis.call('HDEL', prefix .. 'holds', field)
  wake_partitions(prefix, woken)
  return #parked_ids
end

return run(main)
