-- ferry inbox: records a received message for one consumer and says whether to apply it,
-- applying the consumer's writes in the same atomic step when it does. Documented in the
-- README ("Inbox on Redis").
--
-- KEYS: the keys the writes touch (none if there are no writes).
-- ARGV: key prefix, consumer, mode ('admit', or 'check': decide but write nothing), message
--   id (UUID), aggregate_type, aggregate_id, version, how long to remember the id (ms),
--   write count W (0 to 10000), then each write: command, key index in KEYS, argument
--   count, arguments.
-- Returns {verdict, last applied version}: verdict 'apply' (writes applied), 'duplicate'
-- (id seen within its time to live) or 'stale' (version at or below the last applied).
-- Ids expire; the last applied version per aggregate is kept for good, so a message
-- redelivered after its id expired is still refused as stale.

local function main()
  local read = arguments(1)
  local prefix = key_prefix(read.next('key prefix'))
  local consumer = read.next('consumer')
  if not consumer:match('^[%w_.%-]+$') or #consumer > 100 then
    invalid('consumer "' .. consumer .. '" must be 1 to 100 letters, digits, "_", "." or "-"')
  end
  local mode = read.next('mode')
  if mode ~= 'admit' and mode ~= 'check' then
    invalid('mode must be "admit" or "check", got "' .. mode .. '"')
  end
  local id = uuid(read.next('message id'), 'message id')
  local aggregate_type = name(read.next('aggregate_type'), 'aggregate_type')
  local aggregate_id = name(read.next('aggregate_id'), 'aggregate_id')
  local version = read.next('version')
  if not version:match('^[1-9]%d*$') or greater(version, '18446744073709551615') then
    invalid('version must be a whole number from 1 to 18446744073709551615, got "' .. version .. '"')
  end
  local ttl = read.next('id time to live')
  if not ttl:match('^[1-9]%d*$') or #ttl > 15 then
    invalid('the id time to live must be a whole number of milliseconds (1 to 15 digits), got "' .. ttl .. '"')
  end
  local writes = read_writes(read, read.count('write count', 10000), prefix)
  read.finish()

  local seen = prefix .. 'inbox:' .. consumer .. ':id:' .. id
  local versions = prefix .. 'inbox:' .. consumer .. ':versions'
  if redis.call('EXISTS', seen) == 1 then
    return {'duplicate', '0'}
  end
  local field = aggregate_field(aggregate_type, aggregate_id)
  local last = redis.call('HGET', versions, field) or '0'
  local verdict = greater(version, last) and 'apply' or 'stale'
  if mode == 'check' then
    return {verdict, last}
  end
  -- The record holds when it was made, for `ferry cleanup`.
  redis.call('SET', seen, int(now_ms()), 'PX', ttl)
  if verdict == 'apply' then
    redis.call('HSET', versions, field, version)
    apply_writes(writes)
  end
  return {verdict, last}
end

return run(main)
