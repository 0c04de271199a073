-- The `park-aggregate` policy: parks the rejected message and every unpublished message of
-- its aggregate in the partition (in its stream and among its requeued messages), holding
-- the aggregate (`holds`) so that fetches leave its later messages out until an operator
-- requeues them. Fenced like a mark.
-- ARGV: key prefix, partition, epoch, adopted owner ('' for the store's own leases),
--   aggregate_type, aggregate_id, parked by, reason.
-- Returns how many messages were parked, or -1 (fenced: nothing changed).

local SCAN = 1000

-- The entries of `stream` whose message belongs to aggregate (`kind`, `id`).
local function entries_of(stream, kind, id)
  local found = {}
  local start = '-'
  while true do
    local page = redis.call('XRANGE', stream, start, '+', 'COUNT', SCAN)
    for _, item in ipairs(page) do
      local m = field_table(item[2])
      if m.aggregate_type == kind and m.aggregate_id == id then
        found[#found + 1] = item
      end
    end
    if #page < SCAN then
      return found
    end
    start = '(' .. page[#page][1]
  end
end

local function main()
  local prefix, partition, epoch, adopted_by = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  local kind, id, by, reason = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  if not lease_is_current(prefix .. 'lease:' .. partition, epoch, adopted_by) then
    return -1
  end
  local found = {}
  for _, stream in ipairs({prefix .. 'front:' .. partition, prefix .. 'p:' .. partition}) do
    found[stream] = entries_of(stream, kind, id)
  end
  local now = int(now_ms())
  local parked = 0
  for stream, items in pairs(found) do
    for _, item in ipairs(items) do
      park_entry(prefix, stream, item[1], item[2], partition, now, by, reason, '1')
      parked = parked + 1
    end
  end
  if parked > 0 then
    redis.call('HINCRBY', prefix .. 'holds', aggregate_field(kind, id), parked)
  end
  return parked
end

return run(main)
