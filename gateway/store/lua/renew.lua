-- Lease renewal for long streams: push the expiry of a live lease forward. Layout: admit.lua.
-- KEYS: the subjects' hashes of one admission (the first holds its marker).
-- ARGV: [1] lease id, [2] ttl ms.
-- Returns: {leases renewed, the lease's expiry tick (0 when it is gone)}; a lease already
--          expired or reclaimed is not recreated.
local mfield = 'l' .. ARGV[1]
local ttl = tonumber(ARGV[2])
local WINDOW = 60000
local mv = redis.call('HGET', KEYS[1], mfield)
if not mv or string.sub(mv, 1, 1) == 'c' or mv == 's' then
  return {0, 0}
end
local osec, mask = string.match(mv, '^(%d+)|(%d+)$')
osec, mask = tonumber(osec), tonumber(mask)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if osec * 100 <= now then
  return {0, 0}
end
local nsec = math.ceil((now + ttl) / 100)
if nsec <= osec then
  return {0, osec}
end
local renewed = 0
for i = 1, #KEYS do
  local w = {}
  local v = redis.call('HMGET', KEYS[i], 'e' .. osec, 'e' .. nsec, 'x')
  if math.floor(mask / 2 ^ (i - 1)) % 2 == 1 then
    local eo = tonumber(v[1])
    if eo and eo > 0 then
      w = {'e' .. osec, eo - 1, 'e' .. nsec, (tonumber(v[2]) or 0) + 1}
      renewed = renewed + 1
    end
  end
  if i == 1 then
    w[#w + 1] = mfield
    w[#w + 1] = nsec .. '|' .. mask
  end
  if #w > 0 then
    local x = tonumber(v[3])
    local expire = nil
    if not x or nsec * 100 + 1000 > x then
      expire = nsec * 100 + 1000 + WINDOW
      w[#w + 1] = 'x'
      w[#w + 1] = expire
    end
    redis.call('HSET', KEYS[i], unpack(w))
    if expire then redis.call('PEXPIREAT', KEYS[i], expire) end
  end
end
return {renewed, nsec}
