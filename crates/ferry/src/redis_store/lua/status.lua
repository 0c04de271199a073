-- One consistent view of every partition, on the server's clock.
-- ARGV: key prefix. Returns {now (ms), {per partition: {owner, epoch, expires_at,
--   blocked_reason, backlog, created_at of the oldest unpublished message or ''}}}.

local function main()
  local prefix = ARGV[1]
  local partitions = outbox_partitions(prefix)
  local rows = {}
  for partition = 0, partitions - 1 do
    local lease = redis.call('HMGET', prefix .. 'lease:' .. partition, 'owner', 'epoch', 'expires_at', 'blocked_reason')
    local stream = prefix .. 'p:' .. partition
    local oldest = ''
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    if first then
      local fields = first[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'created_at' then
          oldest = fields[i + 1]
        end
      end
    end
    rows[#rows + 1] = {lease[1] or '', lease[2] or '0', lease[3] or '0', lease[4] or '',
      redis.call('XLEN', stream), oldest}
  end
  return {int(now_ms()), rows}
end

return run(main)
