-- Admission: check and consume every limit of one request, all-or-nothing (docs/architecture.md §8).
-- Layout (one hash per subject, all of one request under the reseller's hash tag):
--   r, i, o   GCRA theoretical arrival times (epoch ms, 3 decimals) of rpm, itpm, otpm
--   c         leases counted against the subject's concurrency limit (live ones: see e<tick>)
--   e<tick>   how many of those leases expire at tick <tick> (100 ms units; swept once expired)
--   m         a lower bound of the ticks in e<tick> and l<id> fields: nothing expired before it
--   x         the epoch ms the hash's own expiry is set to (PEXPIREAT: set once a minute at most)
--   g         settled markers not yet swept
--   k         lease ticks created since the last sweep (so e<tick> fields stay bounded)
--   l<id>     in the FIRST subject's hash only: the admission marker of lease <id>,
--             "<tick>|<mask>" (lease expiry tick, bit i-1 set when subject i counts the
--             lease), "c<tick>" (cancelled before it ran, see cancel.lua) or "s" (settled:
--             a retried settlement does nothing; may be swept at any time, as a missing
--             marker means the same)
-- The sweep (HGETALL, then HDEL of what is gone) runs only when it can matter: when a
-- concurrency limit would refuse and some lease may have expired (so a refusal is exact), or
-- 10 s after the oldest tick passed, or once 256 settled markers or 256 new ticks piled up.
-- KEYS: the subjects' hashes. ARGV: [1] lease id, [2] lease ttl ms, [3] input-token cost,
--       [4] output-token cost, then 4 limits per subject: rpm, itpm, otpm, concurrency
--       (0 = unlimited).
-- Returns: {1, <9 bucket values>, lease expiry tick} when admitted, {0, subject index
--          (1-based), dimension index (1 rpm, 2 itpm, 3 otpm, 4 concurrency), retry-after ms as
--          a string, limit, remaining, reset ms as a string} when refused (the refusing bucket
--          as it stands), {2} when this admission was cancelled before it ran.
--          Bucket values: for rpm, itpm, otpm: limit, remaining, reset ms (string) of the
--          tightest subject (limit 0 when no subject limits that dimension).
-- Commands: TIME, then one HMGET and one HSET per subject; a PEXPIREAT about once a minute per
-- subject, and now and then a sweep.
-- Nothing is written before every check passed. The first write is the first subject's
-- HSET (with the marker), or a sweep's HDEL before it (HDEL is allowed out of memory, and
-- then so is the rest of the script): a Redis out of memory refuses the script whole or not
-- at all.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local WINDOW = 60000
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local mfield = 'l' .. lease
local costs = {1, tonumber(ARGV[3]), tonumber(ARGV[4])}
local n = #KEYS
local sec = math.ceil((now + ttl) / 100)
local esec = 'e' .. sec
local NAMES = {'r', 'i', 'o'}
local best = {{0, -1, 0}, {0, -1, 0}, {0, -1, 0}}
local writes, dead, expire = {}, {}, {}
local mask = 0

local function sweep(key)
  -- Drop expired and emptied lease ticks and gone markers; recount the live leases, the
  -- lower bound and the ticks left.
  local all = redis.call('HGETALL', key)
  local gone, c, m = {}, 0, nil
  for j = 1, #all, 2 do
    local f, v = all[j], all[j + 1]
    local p = string.sub(f, 1, 1)
    local s = nil
    if p == 'e' then
      s = tonumber(string.sub(f, 2))
      if tonumber(v) <= 0 then s = 0 end  -- no lease left in it
    elseif p == 'l' then
      s = tonumber(string.match(v, '%d+')) or 0  -- 's': settled, always gone
    end
    if s then
      if s * 100 <= now then
        gone[#gone + 1] = f
      else
        if p == 'e' then c = c + tonumber(v) end
        if not m or s < m then m = s end
      end
    end
  end
  return gone, c, m
end

for i = 1, n do
  local key = KEYS[i]
  local base = 4 + (i - 1) * 4
  local v = redis.call('HMGET', key, 'r', 'i', 'o', 'x', 'c', 'm', esec, mfield, 'g', 'k')
  if i == 1 and v[8] then
    return {2}
  end
  local w = {}
  local need = 0
  for d = 1, 3 do
    local limit = tonumber(ARGV[base + d])
    if limit > 0 then
      local T = WINDOW / limit
      local tat = tonumber(v[d]) or now
      if tat < now then tat = now end
      local new_tat = tat + math.min(costs[d], limit) * T
      -- Stored times carry rounding error (3 decimals of epoch ms): compare with a slack of
      -- at most half a millisecond and half a unit, so a bucket filled within one
      -- millisecond still admits exactly `limit` units.
      local room = WINDOW + math.min(0.5, T / 2)
      if new_tat - now > room then
        return {0, i, d, string.format('%.3f', new_tat - now - WINDOW), limit,
                math.max(math.floor((room - (tat - now)) / T), 0),
                string.format('%.3f', tat - now)}
      end
      w[#w + 1] = NAMES[d]
      w[#w + 1] = string.format('%.3f', new_tat)
      if new_tat > need then need = new_tat end
      local remaining = math.floor((room - (new_tat - now)) / T)
      if best[d][2] < 0 or remaining < best[d][2] then
        best[d] = {limit, remaining, new_tat - now}
      end
    end
  end
  local c = tonumber(v[5]) or 0
  local m = tonumber(v[6])
  local m0 = m
  local climit = tonumber(ARGV[base + 4])
  local g = tonumber(v[9]) or 0
  local k = tonumber(v[10]) or 0
  local k0 = k
  if (m and m * 100 <= now and ((climit > 0 and c >= climit) or m * 100 + 10000 <= now))
      or g >= 256 or k >= 256 then
    dead[i], c, m = sweep(key)
    k = 0  -- ticks created since this sweep (live ones stay: at most one per 100 ms of ttl)
  end
  if climit > 0 then
    if c >= climit then
      return {0, i, 4, '1000', climit, 0, '1000'}
    end
    c = c + 1
    w[#w + 1] = esec
    w[#w + 1] = (tonumber(v[7]) or 0) + 1
    if not v[7] or (dead[i] and tonumber(v[7]) <= 0) then k = k + 1 end
    mask = mask + 2 ^ (i - 1)
  end
  if climit > 0 or i == 1 then
    if not m or sec < m then m = sec end
    if sec * 100 > need then need = sec * 100 end
  end
  if climit > 0 or dead[i] then
    w[#w + 1] = 'c'
    w[#w + 1] = c
  end
  if dead[i] and g > 0 then
    w[#w + 1] = 'g'
    w[#w + 1] = 0
  end
  if k ~= k0 then
    w[#w + 1] = 'k'
    w[#w + 1] = k
  end
  if m ~= m0 then
    if m then
      w[#w + 1] = 'm'
      w[#w + 1] = m
    else
      dead[i][#dead[i] + 1] = 'm'
    end
  end
  local x = tonumber(v[4])
  if need > 0 and (not x or need + 1000 > x) then
    -- Set the expiry a minute beyond what is needed, so it is set again only that often.
    expire[i] = math.ceil(need) + 1000 + WINDOW
    w[#w + 1] = 'x'
    w[#w + 1] = expire[i]
  end
  writes[i] = w
end
writes[1][#writes[1] + 1] = mfield
writes[1][#writes[1] + 1] = sec .. '|' .. mask
for i = 1, n do
  -- The sweep's deletions first: an emptied tick it drops may be the one written now.
  if dead[i] then
    for j = 1, #dead[i], 1000 do
      redis.call('HDEL', KEYS[i], unpack(dead[i], j, math.min(j + 999, #dead[i])))
    end
  end
  if #writes[i] > 0 then
    redis.call('HSET', KEYS[i], unpack(writes[i]))
  end
  if expire[i] then
    redis.call('PEXPIREAT', KEYS[i], expire[i])
  end
end
local out = {1}
for d = 1, 3 do
  out[#out + 1] = best[d][1]
  out[#out + 1] = math.max(best[d][2], 0)
  out[#out + 1] = string.format('%.3f', best[d][3])
end
out[#out + 1] = sec
return out
