-- Usage ledger: settle an addition in doubt (add_usage.lua's call failed after it may have
-- reached Redis, a timeout): was it applied? If not, cancel it, so that it does nothing if it
-- arrives later. Idempotent: asked again, it gives the same answer.
-- KEYS: [1] the additions hash of this store instance and reseller (as add_usage.lua's).
-- ARGV: [1] the addition's number, [2] the additions hash's ttl s.
-- Returns: 1 when that addition was applied, 0 when it was not (and now never will be).
local id = tonumber(ARGV[1])
local marks = redis.call('HMGET', KEYS[1], 'applied', 'cancelled')
if id == tonumber(marks[1] or '0') then
  return 1
end
if id > tonumber(marks[2] or '0') then
  redis.call('HSET', KEYS[1], 'cancelled', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
