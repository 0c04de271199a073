-- Adopts a lease granted outside the store (leases in Redis or etcd): raises the
-- partition's fencing epoch to the grant's, never lowering it, and records its owner. A new
-- epoch clears the previous owner's blocked reason (the new owner records it again if the
-- message still fails).
-- ARGV: key prefix, partition, epoch, owner.
-- Returns the partition's checkpoint ('' for none), or -1 (fenced: a newer epoch, or
--   another owner of the same one, is there; nothing changed).

local function main()
  local prefix, partition, epoch, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  local lease = prefix .. 'lease:' .. partition
  local current = redis.call('HMGET', lease, 'epoch', 'owner', 'checkpoint')
  local held = current[1] or '0'
  if greater(held, epoch) or (held == epoch and current[2] ~= owner) then
    return -1
  end
  if held ~= epoch then
    redis.call('HDEL', lease, 'blocked_reason', 'blocked_at')
  end
  redis.call('HSET', lease, 'epoch', epoch, 'owner', owner)
  return current[3] or ''
end

return run(main)
