-- Cancel an admission the gateway gave up on (its call timed out or the connection broke):
-- if it ran, give back everything it consumed; if it has not run yet, leave a tombstone so
-- that it does nothing when it does. Idempotent.
-- KEYS, ARGV: exactly those of the admission (admit.lua): 4 keys per subject and the marker;
--       lease id, lease ttl ms, input cost, output cost, 4 limits per subject.
-- Returns: 1 when an applied admission was rolled back, 0 otherwise (tombstone placed, or
--          already cancelled or settled).
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local prev = redis.call('SET', KEYS[#KEYS], 'c', 'PX', ttl, 'GET')
if prev ~= 'a' then
  if prev == 's' then redis.call('SET', KEYS[#KEYS], 's', 'PX', ttl) end
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local WINDOW = 60000
local costs = {1, tonumber(ARGV[3]), tonumber(ARGV[4])}
local n = (#KEYS - 1) / 4
for i = 1, n do
  for d = 1, 3 do
    local limit = tonumber(ARGV[4 + (i - 1) * 4 + d])
    if limit > 0 then
      local key = KEYS[(i - 1) * 4 + d]
      local tat = tonumber(redis.call('GET', key) or now)
      local new_tat = tat - math.min(costs[d], limit) * WINDOW / limit
      if new_tat <= now then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
      end
    end
  end
  if tonumber(ARGV[4 + (i - 1) * 4 + 4]) > 0 then
    redis.call('ZREM', KEYS[(i - 1) * 4 + 4], lease)
  end
end
return 1
