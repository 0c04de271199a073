-- Appends messages to one stream with entry ids derived from their outbox sequences, so
-- that Redis itself refuses a second copy of a message (see redis_stream/mod.rs).
--
-- KEYS[1]: the stream.
-- ARGV[1]: MAXLEN for approximate trimming, 0 for none.
-- ARGV[2]: how many entries below the top a late message's earlier copy is looked for.
-- ARGV[3..]: per message: sequence, message id, field count n, then n field/value pairs
--            (one of them `ce_id` = the message id).
--
-- Returns a flat array, a status and a detail per message handled, in order:
--   added <entry id>            appended at <sequence>-0
--   present <entry id>          this message id is already stored at that entry
--   late <entry id>             its sequence is at or below the stream's top and no copy
--                               lies above it: appended after the top
--   late_unverified <entry id>  the same, but more than ARGV[2] entries lie above its
--                               sequence, so an older copy would not have been seen
--   conflict <entry id>         another message holds <sequence>-0; nothing after it runs
--   error <reply>               XADD failed otherwise; nothing after it runs
-- The script runs atomically, so two relays (a paused one and the new owner) cannot
-- interleave between the check and the append.

local key = KEYS[1]
local max_len = tonumber(ARGV[1])
local scan_limit = tonumber(ARGV[2])
local SCAN_CHUNK = 200

-- Decimal strings without leading zeros: shorter is smaller, else compare as text.
local function less(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

local function split(id)
  local dash = string.find(id, "-", 1, true)
  return string.sub(id, 1, dash - 1), string.sub(id, dash + 1)
end

local function id_less(a, b)
  local a_ms, a_seq = split(a)
  local b_ms, b_seq = split(b)
  if a_ms ~= b_ms then
    return less(a_ms, b_ms)
  end
  return less(a_seq, b_seq)
end

-- The decimal string one above `n`.
local function increment(n)
  local digits = {}
  for i = 1, #n do
    digits[i] = string.byte(n, i) - 48
  end
  local i = #digits
  while i >= 1 do
    if digits[i] < 9 then
      digits[i] = digits[i] + 1
      break
    end
    digits[i] = 0
    i = i - 1
  end
  local text = {}
  for j = 1, #digits do
    text[j] = string.char(digits[j] + 48)
  end
  local result = table.concat(text)
  if i == 0 then
    result = "1" .. result
  end
  return result
end

local function message_id_of(fields)
  for i = 1, #fields, 2 do
    if fields[i] == "ce_id" then
      return fields[i + 1]
    end
  end
  return nil
end

local function xadd(entry_id, first, count)
  local command = { "XADD", key }
  if max_len > 0 then
    command[#command + 1] = "MAXLEN"
    command[#command + 1] = "~"
    command[#command + 1] = max_len
  end
  command[#command + 1] = entry_id
  for i = first, first + count - 1 do
    command[#command + 1] = ARGV[i]
  end
  return redis.pcall(unpack(command))
end

local function is_error(reply)
  return type(reply) == "table" and reply.err ~= nil
end

local function last_generated_id()
  local info = redis.call("XINFO", "STREAM", key)
  for i = 1, #info, 2 do
    if info[i] == "last-generated-id" then
      return info[i + 1]
    end
  end
  error("XINFO STREAM reported no last-generated-id for " .. key)
end

-- The tail read so far, top down: message id -> entry id. Entries this script appends are
-- added too, so `seen` always covers everything above `lowest`.
local seen = {}
local lowest = nil
local scanned = 0
local exhausted = false

-- Reads down until every entry above `floor` is in `seen`; false if scan_limit stopped it.
local function scan_above(floor)
  while not exhausted and (lowest == nil or id_less(floor, lowest)) do
    if scanned >= scan_limit then
      return false
    end
    local upper = "+"
    if lowest ~= nil then
      upper = "(" .. lowest
    end
    local count = math.min(SCAN_CHUNK, scan_limit - scanned)
    local entries = redis.call("XREVRANGE", key, upper, "-", "COUNT", count)
    for _, entry in ipairs(entries) do
      local holder = message_id_of(entry[2])
      if holder ~= nil and seen[holder] == nil then
        seen[holder] = entry[1]
      end
      lowest = entry[1]
    end
    scanned = scanned + #entries
    if #entries < count then
      exhausted = true
    end
  end
  return true
end

local results = {}
local function answer(status, detail)
  results[#results + 1] = status
  results[#results + 1] = detail
end

local i = 3
while i <= #ARGV do
  local sequence = ARGV[i]
  local message_id = ARGV[i + 1]
  local first = i + 3
  local count = 2 * tonumber(ARGV[i + 2])
  i = first + count

  local own_id = sequence .. "-0"
  local reply = xadd(own_id, first, count)
  if not is_error(reply) then
    seen[message_id] = reply
    answer("added", reply)
  elseif not string.find(reply.err, "equal or smaller", 1, true) then
    answer("error", reply.err)
    return results
  else
    local at = redis.call("XRANGE", key, own_id, own_id)
    if #at > 0 then
      local holder = message_id_of(at[1][2])
      if holder ~= message_id then
        answer("conflict", own_id .. " holds message " .. tostring(holder))
        return results
      end
      answer("present", own_id)
    else
      local complete = scan_above(own_id)
      if seen[message_id] ~= nil then
        answer("present", seen[message_id])
      else
        local top_ms, top_seq = split(last_generated_id())
        local late_id = top_ms .. "-" .. increment(top_seq)
        local late = xadd(late_id, first, count)
        if is_error(late) then
          answer("error", late.err)
          return results
        end
        seen[message_id] = late
        if complete then
          answer("late", late)
        else
          answer("late_unverified", late)
        end
      end
    end
  end
end
return results
