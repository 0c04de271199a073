-- Creates or upgrades an outbox under a key prefix, idempotently.
-- Version 2 indexes published messages kept for replay by sequence (`kept`); an outbox of
-- version 1 has its kept messages indexed here, once.
-- ARGV: key prefix, partitions, schema version, enqueue script text, its SHA1.
-- Lease epochs start at the server's clock in ms, so that epochs stay unique even if the
-- Redis data set is lost and the outbox created again (a relay from before cannot match).

local function main()
  local prefix, partitions, version = ARGV[1], ARGV[2], ARGV[3]
  local meta = prefix .. 'meta'
  local existing = redis.call('HMGET', meta, 'partitions', 'schema_version')
  if existing[1] and existing[1] ~= partitions then
    fail('FERRY_SCHEMA', 'the outbox under the key prefix "' .. prefix .. '" was created with ' .. existing[1]
      .. ' partitions; the count is fixed at set-up (set partitions = ' .. existing[1] .. ')')
  end
  if existing[2] and tonumber(existing[2]) > tonumber(version) then
    fail('FERRY_SCHEMA', 'the outbox under the key prefix "' .. prefix .. '" has ferry schema version '
      .. existing[2] .. ', newer than this ferry (' .. version .. '); upgrade ferry')
  end
  local epoch = int(now_ms())
  for partition = 0, tonumber(partitions) - 1 do
    local lease = prefix .. 'lease:' .. partition
    if redis.call('EXISTS', lease) == 0 then
      redis.call('HSET', lease, 'owner', '', 'epoch', epoch, 'expires_at', '0', 'clean', '1')
    end
  end
  if existing[2] == '1' then
    for partition = 0, tonumber(partitions) - 1 do
      for _, item in ipairs(redis.call('XRANGE', prefix .. 'done:' .. partition, '-', '+')) do
        redis.call('ZADD', prefix .. 'kept', field_table(item[2]).sequence, partition .. ' ' .. item[1])
      end
    end
  end
  redis.call('HSET', meta, 'partitions', partitions, 'schema_version', version,
    'enqueue_script', ARGV[4], 'enqueue_sha', ARGV[5])
  return 'OK'
end

return run(main)
