-- One consistent view of every partition, on the server's clock.
-- ARGV: key prefix. Returns {now (ms), {per partition: {owner, epoch, expires_at,
--   blocked_reason, backlog, created_at of the oldest unpublished message or ''}}}. The
--   backlog counts the partition's stream and its requeued messages.

-- The created_at of the first entry of `stream`, or nil.
local function oldest_in(stream)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  return first and tonumber(field_table(first[2]).created_at)
end

local function main()
  local prefix = ARGV[1]
  local partitions = outbox_partitions(prefix)
  local rows = {}
  for partition = 0, partitions - 1 do
    local lease = redis.call('HMGET', prefix .. 'lease:' .. partition, 'owner', 'epoch',
      'expires_at', 'blocked_reason')
    local stream, front = prefix .. 'p:' .. partition, prefix .. 'front:' .. partition
    local oldest = oldest_in(stream)
    local requeued = oldest_in(front)
    if requeued and (not oldest or requeued < oldest) then
      oldest = requeued
    end
    rows[#rows + 1] = {lease[1] or '', lease[2] or '0', lease[3] or '0', lease[4] or '',
      redis.call('XLEN', stream) + redis.call('XLEN', front), oldest and int(oldest) or ''}
  end
  return {int(now_ms()), rows}
end

return run(main)
