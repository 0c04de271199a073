-- ferry enqueue: appends messages to the outbox and applies the caller's business writes,
-- all or nothing, in one atomic step. Documented in the README ("Enqueue from any
-- language"); the text ferry loads is in the outbox's meta hash, field `enqueue_script`.
--
-- KEYS: the business keys the writes touch (none if there are no writes).
-- ARGV: key prefix, message count M (1 to 10000), write count W (0 to 10000), then for each
--   message: id (UUID), aggregate_type, aggregate_id, event_type, payload, headers (a JSON
--   object of strings, or '' for none), partition_key ('' for aggregate_type/aggregate_id),
--   then each write: command, key index in KEYS, argument count, arguments, then
--   optionally the W3C trace context of every message of the call: traceparent, and
--   tracestate after it ('' for none; a message's headers must not hold them as well).
-- Returns one {id, version, partition, sequence} per message, in order.

-- 32-bit FNV-1a of the key's bytes, mod P: the same as ferry's Rust `partition_for`.
-- h * 16777619 = h * 2^24 + h * 403, taken mod 2^32 without exceeding 2^53.
local function partition_for(key, partitions)
  local h = 2166136261
  for i = 1, #key do
    h = bit.bxor(h, string.byte(key, i)) % 4294967296
    h = ((h % 256) * 16777216 + h * 403) % 4294967296
  end
  return h % partitions
end

local function headers_table(text, what)
  if text == '' then
    return {}
  end
  local ok, decoded = pcall(cjson.decode, text)
  if not ok or type(decoded) ~= 'table' then
    invalid(what .. ' headers must be a JSON object of strings, got ' .. text)
  end
  for header, value in pairs(decoded) do
    if type(header) ~= 'string' or type(value) ~= 'string' then
      invalid(what .. ' headers must be a JSON object of strings, got ' .. text)
    end
    if not header:match('^[!#-9;-~]+$') then
      invalid('header name "' .. header .. '" is not allowed: use visible ASCII without \':\' or quotes, e.g. "traceparent"')
    end
    if value:find('[\r\n]') then
      invalid('header "' .. header .. '" has a line break in its value')
    end
  end
  return decoded
end

-- A W3C traceparent: version-traceid-parentid-flags, 2, 32, 16 and 2 lowercase hex digits,
-- non-zero ids; a later version may add fields after a '-'.
local function valid_traceparent(value)
  local version, trace_id, parent_id, rest = value:match('^(%x%x)%-(' .. string.rep('%x', 32) .. ')%-(' .. string.rep('%x', 16) .. ')%-%x%x(.*)$')
  return version ~= nil and value == value:lower() and version ~= 'ff'
    and (rest == '' or (version ~= '00' and rest:sub(1, 1) == '-'))
    and trace_id ~= string.rep('0', 32) and parent_id ~= string.rep('0', 16)
end

-- The headers as stored: the call's trace context merged in, the traceparent checked as
-- the Rust API checks it.
local function stored_headers(headers, text, traceparent, tracestate, what)
  for header, value in pairs({traceparent = traceparent, tracestate = tracestate}) do
    if value ~= '' then
      if headers[header] ~= nil then
        invalid(what .. ': ' .. header .. ' is given twice, as an argument and in the headers: pass it once')
      end
      headers[header] = value
      text = nil
    end
  end
  if headers.traceparent ~= nil and not valid_traceparent(headers.traceparent) then
    invalid(what .. ': traceparent "' .. headers.traceparent .. '" is not a W3C trace context: use version-traceid-parentid-flags, 2, 32, 16 and 2 lowercase hex digits, non-zero ids (e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)')
  end
  if headers.tracestate ~= nil and headers.traceparent == nil then
    invalid(what .. ': a tracestate goes with a traceparent: pass both')
  end
  if text == nil then
    return cjson.encode(headers)
  end
  if text == '' then
    return '{}'
  end
  return text
end

local function main()
  local read = arguments(1)
  local prefix = key_prefix(read.next('key prefix'))
  local partitions = outbox_partitions(prefix)
  local count = read.count('message count', 10000)
  if count == 0 then
    invalid('message count must be at least 1')
  end
  local write_count = read.count('write count', 10000)
  local ids = prefix .. 'ids'
  local messages = {}
  local seen = {}
  for i = 1, count do
    local what = 'message ' .. i
    local m = {}
    m.id = uuid(read.next(what .. ' id'), what .. ' id')
    if seen[m.id] or redis.call('HEXISTS', ids, m.id) == 1 then
      invalid(what .. ' id ' .. m.id .. ' is already in the outbox')
    end
    seen[m.id] = true
    m.aggregate_type = name(read.next(what .. ' aggregate_type'), 'aggregate_type')
    m.aggregate_id = name(read.next(what .. ' aggregate_id'), 'aggregate_id')
    m.event_type = name(read.next(what .. ' event_type'), 'event_type')
    m.payload = read.next(what .. ' payload')
    m.headers_text = read.next(what .. ' headers')
    m.headers = headers_table(m.headers_text, what)
    m.partition_key = read.next(what .. ' partition_key')
    if m.partition_key == '' then
      m.partition_key = m.aggregate_type .. '/' .. m.aggregate_id
    end
    m.partition = partition_for(m.partition_key, partitions)
    messages[i] = m
  end
  local writes = read_writes(read, write_count, prefix)
  local traceparent = read.optional() or ''
  local tracestate = read.optional() or ''
  read.finish()
  for i, m in ipairs(messages) do
    m.headers = stored_headers(m.headers, m.headers_text, traceparent, tracestate, 'message ' .. i)
  end

  -- Every check passed: nothing below can fail.
  apply_writes(writes)
  local created_at = int(now_ms())
  local results = {}
  local wake = {}
  local touched = {}
  for i, m in ipairs(messages) do
    local version = redis.call('HINCRBY', prefix .. 'versions', aggregate_field(m.aggregate_type, m.aggregate_id), 1)
    local sequence = redis.call('INCR', prefix .. 'seq')
    local entry = redis.call('XADD', prefix .. 'p:' .. m.partition, '*',
      'id', m.id, 'sequence', int(sequence), 'aggregate_type', m.aggregate_type,
      'aggregate_id', m.aggregate_id, 'version', int(version), 'event_type', m.event_type,
      'partition_key', m.partition_key, 'headers', m.headers, 'created_at', created_at,
      'payload', m.payload)
    redis.call('HSET', ids, m.id, m.partition .. ' ' .. entry)
    if not touched[m.partition] then
      touched[m.partition] = true
      wake[#wake + 1] = int(m.partition)
    end
    results[i] = {m.id, version, m.partition, sequence}
  end
  -- One wake-up per call, naming the partitions it wrote to, for relays blocked in XREAD.
  redis.call('XADD', prefix .. 'wake', 'MAXLEN', '~', '10000', '*', 'p', table.concat(wake, ','))
  return results
end

return run(main)
