-- Lease renewal for long streams: push the expiry of live leases forward.
-- KEYS: concurrency zsets (one reseller's hash tag).
-- ARGV: [1] lease id, [2] ttl ms.
-- Returns: the number of leases renewed (a lease already reclaimed is not recreated).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local renewed = 0
for _, key in ipairs(KEYS) do
  renewed = renewed + redis.call('ZADD', key, 'XX', 'CH', now + ttl, ARGV[1])
  if redis.call('PTTL', key) < ttl * 2 then redis.call('PEXPIRE', key, ttl * 2) end
end
return renewed
