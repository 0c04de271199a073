-- ferry's shared Lua helpers, put in front of every ferry script.
--
-- Redis does not roll a script back when it fails half-way: whatever it wrote before the
-- error stays. So every ferry script checks all of its input first and writes only after
-- the last check; a failed check raises {err = '<CODE> <message>'}, which `run` returns as
-- the error reply, with nothing written. Codes: FERRY_INVALID (bad arguments),
-- FERRY_SCHEMA (no outbox under the key prefix: run `ferry migrate`).

local function fail(code, message)
  error({err = code .. ' ' .. message})
end

local function invalid(message)
  fail('FERRY_INVALID', message)
end

-- Runs `main`, returning a failed check as its own error reply (Redis hands `pcall` the
-- `err` text of a raised table) and anything else as a ferry script failure.
local function run(main)
  local ok, result = pcall(main)
  if ok then
    return result
  end
  result = tostring(result)
  if result:match('^FERRY_') then
    return redis.error_reply(result)
  end
  return redis.error_reply('ERR ferry script failed: ' .. result)
end

-- The server's clock in milliseconds: every lease decision uses it, never a relay's.
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- A whole number as a decimal string (Lua prints large numbers in exponent form).
local function int(n)
  return string.format('%d', n)
end

-- Whether decimal string `a` is greater than `b` (digits only, no leading zeros): exact at
-- any length, where Lua numbers lose precision past 2^53.
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end

-- Reads ARGV in order from `first`, naming what is missing or malformed.
local function arguments(first)
  local position = first
  local read = {}
  function read.next(what)
    local value = ARGV[position]
    if value == nil then
      invalid('argument ' .. position .. ' (' .. what .. ') is missing')
    end
    position = position + 1
    return value
  end
  function read.count(what, max)
    local text = read.next(what)
    if not text:match('^%d+$') or #text > 9 or tonumber(text) > max then
      invalid(what .. ' must be a whole number from 0 to ' .. max .. ', got "' .. text .. '"')
    end
    return tonumber(text)
  end
  -- The next argument if there is one, else nil: for optional trailing arguments.
  function read.optional()
    local value = ARGV[position]
    if value ~= nil then
      position = position + 1
    end
    return value
  end
  function read.finish()
    if ARGV[position] ~= nil then
      invalid((#ARGV - position + 1) .. ' argument(s) left over after argument ' .. (position - 1))
    end
  end
  return read
end

-- The key prefix every ferry key starts with.
local function key_prefix(text)
  if text == '' then
    invalid('the key prefix must not be empty (e.g. "ferry:")')
  end
  return text
end

-- The outbox's partition count P, recorded by `ferry migrate`.
local function outbox_partitions(prefix)
  local partitions = tonumber(redis.call('HGET', prefix .. 'meta', 'partitions'))
  if not partitions then
    fail('FERRY_SCHEMA', 'there is no ferry outbox under the key prefix "' .. prefix .. '" in this Redis')
  end
  return partitions
end

local function name(text, field)
  if text == '' then
    invalid(field .. ' must not be empty')
  end
  if #text > 255 then
    invalid(field .. ' is ' .. #text .. ' bytes long; the limit is 255')
  end
  return text
end

-- A UUID in its canonical lowercase text form.
local function uuid(text, field)
  local lower = string.lower(text)
  if not lower:match('^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$') then
    invalid(field .. ' "' .. text .. '" is not a UUID (8-4-4-4-12 hexadecimal digits)')
  end
  return lower
end

-- The hash field naming an aggregate: '<byte length of type>:<type>/<id>', unambiguous
-- whatever characters the type and id contain.
local function aggregate_field(aggregate_type, aggregate_id)
  return #aggregate_type .. ':' .. aggregate_type .. '/' .. aggregate_id
end

-- The caller's own writes, applied in the same script as ferry's. For each command: the
-- type its key must hold (or be missing), and how many arguments follow the key.
local WRITES = {
  SET = {args = 'one'},
  DEL = {args = 'none'},
  PEXPIRE = {args = 'one', check = 'milliseconds'},
  HSET = {kind = 'hash', args = 'pairs', adds = true},
  HDEL = {kind = 'hash', args = 'some'},
  SADD = {kind = 'set', args = 'some', adds = true},
  SREM = {kind = 'set', args = 'some'},
  ZADD = {kind = 'zset', args = 'pairs', check = 'scores', adds = true},
  ZREM = {kind = 'zset', args = 'some'},
  RPUSH = {kind = 'list', args = 'some', adds = true},
  LPUSH = {kind = 'list', args = 'some', adds = true},
}
local MAX_WRITE_ARGS = 1000
local ARGS_RULE = {
  none = 'no argument', one = 'exactly 1 argument', some = 'at least 1 argument',
  pairs = 'a non-empty even number of arguments',
}

local function check_write_args(command, spec, args, what)
  local n = #args
  local shape_ok = (spec.args == 'none' and n == 0) or (spec.args == 'one' and n == 1)
    or (spec.args == 'some' and n >= 1) or (spec.args == 'pairs' and n >= 2 and n % 2 == 0)
  if not shape_ok then
    invalid(what .. ': ' .. command .. ' takes ' .. ARGS_RULE[spec.args] .. ' after the key, got ' .. n)
  end
  if spec.check == 'milliseconds' and not (args[1]:match('^[1-9]%d*$') and #args[1] <= 15) then
    invalid(what .. ': PEXPIRE milliseconds must be a whole number from 1 to 15 digits, got "' .. args[1] .. '"')
  end
  if spec.check == 'scores' then
    for j = 1, n, 2 do
      if not args[j]:match('^%-?%d+%.?%d*$') then
        invalid(what .. ': ZADD score "' .. args[j] .. '" is not a decimal number such as 12 or -1.5')
      end
    end
  end
end

-- Reads `count` writes: each is a command, the 1-based index of its key in KEYS, the number
-- of arguments and the arguments. Checks each against the type its key will hold by then,
-- so that applying them cannot fail. Keys under `prefix` (ferry's own) are refused.
local function read_writes(read, count, prefix)
  local writes = {}
  local predicted = {}
  for i = 1, count do
    local what = 'write ' .. i
    local command = string.upper(read.next(what .. ' command'))
    local spec = WRITES[command]
    if not spec then
      invalid(what .. ': command "' .. command .. '" is not supported (use SET, DEL, PEXPIRE, HSET, HDEL, SADD, SREM, ZADD, ZREM, RPUSH or LPUSH)')
    end
    local index = read.count(what .. ' key index', #KEYS)
    local key = KEYS[index]
    if key == nil then
      invalid(what .. ': key index ' .. index .. ' is not in KEYS (1 to ' .. #KEYS .. ')')
    end
    if key:sub(1, #prefix) == prefix then
      invalid(what .. ': key "' .. key .. '" is under ferry\'s key prefix "' .. prefix .. '"; business keys must be elsewhere')
    end
    local n = read.count(what .. ' argument count', MAX_WRITE_ARGS)
    local args = {}
    for j = 1, n do
      args[j] = read.next(what .. ' argument ' .. j)
    end
    check_write_args(command, spec, args, what)
    if predicted[key] == nil then
      predicted[key] = redis.call('TYPE', key).ok
    end
    if spec.kind then
      if predicted[key] ~= 'none' and predicted[key] ~= spec.kind then
        invalid(what .. ': ' .. command .. ' needs a ' .. spec.kind .. ' but key "' .. key .. '" holds a ' .. predicted[key])
      end
      if spec.adds then
        predicted[key] = spec.kind
      end
    elseif command == 'SET' then
      predicted[key] = 'string'
    elseif command == 'DEL' then
      predicted[key] = 'none'
    end
    writes[i] = {command, key, args}
  end
  return writes
end

local function apply_writes(writes)
  for _, write in ipairs(writes) do
    redis.call(write[1], write[2], unpack(write[3]))
  end
end

-- Whether the lease of `lease` (a lease hash key) with `epoch` is current: on the server's
-- clock for the store's own leases, or, for a lease adopted from an outside backend
-- (`adopted_by` not ''), while its epoch and owner are the adopted ones. The check every
-- fenced write (mark, park, taking a retry request) makes first.
local function lease_is_current(lease, epoch, adopted_by)
  local current = redis.call('HMGET', lease, 'epoch', 'expires_at', 'owner')
  if current[1] ~= epoch then
    return false
  end
  if adopted_by == '' then
    return (tonumber(current[2]) or 0) > now_ms()
  end
  return current[3] == adopted_by
end

-- A stream entry's or hash's flat {field, value, ...} list as a table.
local function field_table(fields)
  local t = {}
  for i = 1, #fields, 2 do
    t[fields[i]] = fields[i + 1]
  end
  return t
end

-- Where the `ids` index says an unpublished message is: its partition, the stream key and
-- the entry id ('<partition> <entry>' in `p:<n>`, '<partition> f<entry>' in `front:<n>`,
-- requeued messages), or nil for a message that is parked, published or unknown.
local function locate(prefix, location)
  local partition, front, entry = string.match(location or '', '^(%d+) (f?)(%d+%-%d+)$')
  if not partition then
    return nil
  end
  local stream = prefix .. (front == 'f' and 'front:' or 'p:') .. partition
  return partition, stream, entry
end

-- Moves the entry `entry` of `stream` (message fields `fields`, of partition `partition`)
-- to the parked messages: a hash per message, indexed by sequence, by aggregate and by
-- when it was parked. `holds` ('1'/'0') says whether it holds its aggregate.
local function park_entry(prefix, stream, entry, fields, partition, now, by, reason, holds)
  local m = field_table(fields)
  local parked = prefix .. 'parked:' .. m.id
  redis.call('DEL', parked)
  redis.call('HSET', parked, unpack(fields))
  redis.call('HSET', parked, 'partition', partition, 'parked_at', now, 'parked_by', by,
    'reason', reason, 'holds', holds)
  redis.call('ZADD', prefix .. 'parked', m.sequence, m.id)
  redis.call('ZADD', prefix .. 'parked_at', now, m.id)
  redis.call('ZADD', prefix .. 'parked_of:' .. aggregate_field(m.aggregate_type, m.aggregate_id), m.sequence, m.id)
  redis.call('HSET', prefix .. 'ids', m.id, 'parked')
  redis.call('XDEL', stream, entry)
  return m
end

-- Wakes relays blocked in XREAD for the partitions in `partitions` (a list of numbers).
local function wake_partitions(prefix, partitions)
  if #partitions > 0 then
    redis.call('XADD', prefix .. 'wake', 'MAXLEN', '~', '10000', '*', 'p', table.concat(partitions, ','))
  end
end
