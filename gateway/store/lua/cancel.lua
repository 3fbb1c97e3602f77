-- Cancel an admission the gateway gave up on (its call timed out or the connection broke):
-- if it ran, give back everything it consumed; if it has not run yet, leave a tombstone so
-- that it does nothing when it does. Idempotent. Layout: admit.lua.
-- KEYS, ARGV: exactly those of the admission's part of its admit.lua call: one hash per
--       subject; number of subjects, lease id, lease ttl ms, input cost, output cost, 4 limits
--       per subject.
-- Returns: 1 when an applied admission was rolled back, 0 otherwise (tombstone placed, or
--          already cancelled or settled).
local lease, ttl = ARGV[2], tonumber(ARGV[3])
local mfield = 'l' .. lease
local WINDOW = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local head = redis.call('HMGET', KEYS[1], mfield, 'm', 'x')
local mv = head[1]
if not mv or string.sub(mv, 1, 1) == 'c' or mv == 's' then
  if not mv then
    -- The tombstone lives as long as the lease would have (swept after that).
    local s = math.ceil((now + ttl) / 100)
    local w = {mfield, 'c' .. s}
    local m, x = tonumber(head[2]), tonumber(head[3])
    if not m or s < m then
      w[#w + 1] = 'm'
      w[#w + 1] = s
    end
    local expire = nil
    if not x or s * 100 + 1000 > x then
      expire = s * 100 + 1000 + WINDOW
      w[#w + 1] = 'x'
      w[#w + 1] = expire
    end
    redis.call('HSET', KEYS[1], unpack(w))
    if expire then redis.call('PEXPIREAT', KEYS[1], expire) end
  end
  return 0
end
local sec, mask = string.match(mv, '^(%d+)|(%d+)$')
sec, mask = tonumber(sec), tonumber(mask)
local costs = {1, tonumber(ARGV[4]), tonumber(ARGV[5])}
local NAMES = {'r', 'i', 'o'}
for i = 1, #KEYS do
  local base = 5 + (i - 1) * 4
  local v = redis.call('HMGET', KEYS[i], 'r', 'i', 'o', 'c', 'e' .. sec)
  local w = {}
  for d = 1, 3 do
    local limit = tonumber(ARGV[base + d])
    local tat = tonumber(v[d])
    if limit > 0 and tat then
      w[#w + 1] = NAMES[d]
      w[#w + 1] = tat - math.min(costs[d], limit) * WINDOW / limit
    end
  end
  if math.floor(mask / 2 ^ (i - 1)) % 2 == 1 then
    local e = tonumber(v[5])
    if e and e > 0 then
      w[#w + 1] = 'e' .. sec
      w[#w + 1] = e - 1
      w[#w + 1] = 'c'
      w[#w + 1] = math.max((tonumber(v[4]) or 1) - 1, 0)
    end
  end
  if i == 1 then
    w[#w + 1] = mfield
    w[#w + 1] = 'c' .. sec
  end
  if #w > 0 then redis.call('HSET', KEYS[i], unpack(w)) end
end
return 1
