-- Settlement: correct token buckets from reserved to actual usage and release the lease.
-- Layout: admit.lua. KEYS: the subjects' hashes (the first holds the admission marker).
-- ARGV: [1] lease id, [2] the lease's expiry tick (100 ms units) as admit.lua or renew.lua answered it
--       (0 when not known: then it is read from the marker), then 4 per subject: itpm limit,
--       otpm limit, input delta, output delta (delta = actual - reserved, in tokens; negative
--       refunds, never below a full bucket).
-- Returns: the number of leases released, or -1 when this admission was already settled or
--          cancelled, or its marker expired (a retried settlement applies once).
-- The marker becomes "s" (swept later, admit.lua), so settling writes nothing more.
-- Commands: one HMGET and one HSET per subject; TIME only when a
-- delta is positive (a refund needs no clock: admission clamps a time in the past to now).
local mfield = 'l' .. ARGV[1]
local sec = tonumber(ARGV[2])
local n = #KEYS
local WINDOW = 60000
local vals = {}
vals[1] = redis.call('HMGET', KEYS[1], 'i', 'o', 'x', 'c', 'e' .. sec, mfield, 'g')
local mv = vals[1][6]
local head = string.sub(mv or 's', 1, 1)
if head == 'c' or head == 's' then
  return -1
end
local msec, mask = string.match(mv, '^(%d+)|(%d+)$')
msec, mask = tonumber(msec), tonumber(mask)
if msec ~= sec then
  sec = msec
  vals[1][5] = redis.call('HGET', KEYS[1], 'e' .. sec)
end
for i = 2, n do
  vals[i] = redis.call('HMGET', KEYS[i], 'i', 'o', 'x', 'c', 'e' .. sec)
end
local now = nil
local released = 0
local NAMES = {'i', 'o'}
for i = 1, n do
  local v = vals[i]
  local w = {}
  local base = 2 + (i - 1) * 4
  local need = 0
  for d = 1, 2 do
    local limit = tonumber(ARGV[base + d])
    local delta = tonumber(ARGV[base + 2 + d])
    local tat = tonumber(v[d])
    if limit > 0 and delta ~= 0 and (tat or delta > 0) then
      if delta > 0 then
        if not now then
          local t = redis.call('TIME')
          now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        end
        if not tat or tat < now then tat = now end
      end
      local new_tat = tat + delta * WINDOW / limit
      w[#w + 1] = NAMES[d]
      w[#w + 1] = string.format('%.3f', new_tat)
      if new_tat > need then need = new_tat end
    end
  end
  if math.floor(mask / 2 ^ (i - 1)) % 2 == 1 then
    local e = tonumber(v[5])
    -- A bucket already swept (the lease expired) was taken off the count by the sweep.
    if e and e > 0 then
      w[#w + 1] = 'e' .. sec
      w[#w + 1] = e - 1
      w[#w + 1] = 'c'
      w[#w + 1] = math.max((tonumber(v[4]) or 1) - 1, 0)
      released = released + 1
    end
  end
  if i == 1 then
    w[#w + 1] = mfield
    w[#w + 1] = 's'
    w[#w + 1] = 'g'
    w[#w + 1] = (tonumber(v[7]) or 0) + 1
  end
  local x = tonumber(v[3])
  local expire = nil
  if need > 0 and (not x or need + 1000 > x) then
    expire = math.ceil(need) + 1000 + WINDOW
    w[#w + 1] = 'x'
    w[#w + 1] = expire
  end
  if #w > 0 then
    redis.call('HSET', KEYS[i], unpack(w))
  end
  if expire then
    redis.call('PEXPIREAT', KEYS[i], expire)
  end
end
return released
