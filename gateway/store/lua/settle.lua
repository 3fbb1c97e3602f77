-- Settlement of one or more requests (a batch: settlements of one moment share one call):
-- correct token buckets from reserved to actual usage and release the lease. Layout: admit.lua.
-- KEYS: for each settlement in turn, its subjects' hashes (the first holds the marker).
-- ARGV: [1] number of settlements, then for each: the number of its subjects, lease id, the
--       lease's expiry tick (100 ms units) as admit.lua or renew.lua answered it (0 when not
--       known: then it is read from the marker), then 4 per subject: itpm limit, otpm limit,
--       input delta, output delta (delta = actual - reserved, in tokens; negative refunds,
--       never below a full bucket).
-- Returns: per settlement, the number of leases released, or -1 when this admission was
--          already settled or cancelled, or its marker expired (a retried settlement applies
--          once). Settlements of one batch are independent: each applies whole or not at all.
-- The marker becomes "s" (swept later, admit.lua), so settling writes nothing more.
-- Commands: one HMGET and one HSET per subject; TIME only when a
-- delta is positive (a refund needs no clock: admission clamps a time in the past to now).
local WINDOW = 60000
local now = nil

local function settle_one(K, A, n)
  local mfield = 'l' .. A[1]
  local sec = tonumber(A[2])
  local vals = {}
  vals[1] = redis.call('HMGET', K[1], 'i', 'o', 'x', 'c', 'e' .. sec, mfield, 'g')
  local mv = vals[1][6]
  local head = string.sub(mv or 's', 1, 1)
  if head == 'c' or head == 's' then
    return -1
  end
  local msec, mask = string.match(mv, '^(%d+)|(%d+)$')
  msec, mask = tonumber(msec), tonumber(mask)
  if msec ~= sec then
    sec = msec
    vals[1][5] = redis.call('HGET', K[1], 'e' .. sec)
  end
  for i = 2, n do
    vals[i] = redis.call('HMGET', K[i], 'i', 'o', 'x', 'c', 'e' .. sec)
  end
  local released = 0
  local NAMES = {'i', 'o'}
  for i = 1, n do
    local v = vals[i]
    local w = {}
    local base = 2 + (i - 1) * 4
    local need = 0
    for d = 1, 2 do
      local limit = tonumber(A[base + d])
      local delta = tonumber(A[base + 2 + d])
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
      redis.call('HSET', K[i], unpack(w))
    end
    if expire then
      redis.call('PEXPIREAT', K[i], expire)
    end
  end
  return released
end

local out = {}
local kpos, apos = 0, 2
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[apos])
  local K, A = {}, {}
  for j = 1, n do K[j] = KEYS[kpos + j] end
  for j = 1, 2 + 4 * n do A[j] = ARGV[apos + j] end
  out[#out + 1] = settle_one(K, A, n)
  kpos = kpos + n
  apos = apos + 3 + 4 * n
end
return out
