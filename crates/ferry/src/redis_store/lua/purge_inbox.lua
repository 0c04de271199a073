-- Deletes inbox id records (KEYS, `<prefix>inbox:<consumer>:id:<id>`, as a SCAN found
-- them) recorded longer than `older than` ago. Records hold the time they were made (ms);
-- older ones, holding '1', are left to their own expiry.
-- ARGV: older than (ms). Returns how many were deleted.

local function main()
  local before = now_ms() - tonumber(ARGV[1])
  local deleted = 0
  for _, key in ipairs(KEYS) do
    local at = tonumber(redis.call('GET', key) or '')
    if at and at > 1 and at < before then
      deleted = deleted + redis.call('DEL', key)
    end
  end
  return deleted
end

return run(main)
