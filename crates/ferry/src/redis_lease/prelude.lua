-- Shared by every lease script. Redis 7 replicates scripts by their effects, which lets
-- them read the clock before writing; older servers must be told so.
if redis.replicate_commands then
  redis.replicate_commands()
end

-- The server's clock in unix milliseconds: every relay uses this one clock for expiry.
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
