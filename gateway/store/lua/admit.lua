-- Admissions and settlements of one moment in one call (docs/architecture.md §8): the
-- settlements first (a lease they release is free for the admissions), then the admissions.
-- Each is independent and applies whole or not at all; an admission checks and consumes
-- every limit of its request or nothing.
-- Layout (one hash per subject, all of one request under the reseller's hash tag):
--   r, i, o   GCRA theoretical arrival times (epoch ms, a double) of rpm, itpm, otpm
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
-- 10 s after the oldest tick passed, or once 32 settled markers or 32 new ticks piled up (so
-- a hash stays small: up to 128 fields Redis keeps it as a listpack, whose lookups scan it).
-- KEYS: the subjects' hashes of each settlement, then of each admission, in ARGV's order.
-- ARGV: [1] number of settlements S, [2] number of admissions A, then per settlement: its
--       number of subjects n, lease id, the lease's expiry tick as an admission or renew.lua
--       answered it (0 when not known: then it is read from the marker), then per subject:
--       itpm limit, otpm limit, input delta, output delta (delta = actual - reserved, in
--       tokens; negative refunds, never below a full bucket); then per admission: n, lease
--       id, lease ttl ms, input-token cost, output-token cost, then per subject: rpm, itpm,
--       otpm, concurrency limits (0 = unlimited).
-- Returns: {S settlement replies, A admission replies}. A settlement: the number of leases
--          released, or -1 when it was already settled or cancelled, or its marker expired
--          (a retried settlement applies once). An admission: {1, <9 bucket values>, lease
--          expiry tick} when admitted, {0, subject index (1-based), dimension index (1 rpm,
--          2 itpm, 3 otpm, 4 concurrency), retry-after us, limit, remaining, reset us} when
--          refused (the refusing bucket as it stands), {2} when it was cancelled before it
--          ran. Bucket values: for rpm, itpm, otpm: limit, remaining, reset us of the
--          tightest subject (limit 0 when no subject limits that dimension). Times in the
--          replies are whole microseconds (a reply turns Lua numbers into integers).
-- Commands: TIME (unless the call only refunds), one HMGET per hash the call reads (of all
-- the fields its requests need) and one HSET per hash it changes; a PEXPIREAT about once a
-- minute per hash, and now and then a sweep. Values are kept in Lua tables meanwhile (`h`),
-- so a hash shared by several requests of the call (their reseller's) is read and written once.
-- Nothing is written before every request of the call was decided. The first write is an
-- HDEL (allowed out of memory, and then so is the rest of the script) or an HSET: a Redis out
-- of memory refuses the call whole or not at all.
local WINDOW = 60000
local NAMES = {'r', 'i', 'o'}
local floor, max, ceil, tonumber, sub = math.floor, math.max, math.ceil, tonumber, string.sub
local nset, nadm = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Per hash: its fields as read (numbers where they are numbers, false when absent) and as
-- changed since, the fields changed, and the expiry to set.
local h, dirty, expire = {}, {}, {}
local order, extra = {}, {}  -- the hashes in the order first named, the fields each needs
local P, B = {}, {}  -- an admission's plan (7 values per subject) and best buckets, reused
local now = nil  -- the server's clock in ms, read once (a call that only refunds needs none)

local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
  end
  return now
end

local function want(key, f)
  -- Name a field of `key` to read, besides the fields every call reads.
  local e = extra[key]
  if not e then
    e = {}
    extra[key] = e
    order[#order + 1] = key
  end
  e[#e + 1] = f
end

local function expire_at(key, need)
  -- Set the expiry a minute beyond what is needed, so it is set again only that often.
  local hk = h[key]
  local x = hk.x
  if need > 0 and (not x or need + 1000 > x) then
    x = ceil(need) + 1000 + WINDOW
    hk.x = x
    dirty[key].x = true
    expire[key] = x
  end
end

local function sweep(key)
  -- Drop expired and emptied lease ticks and gone markers; recount the live leases, the
  -- lower bound and the ticks left.
  local hk, dk = h[key], dirty[key]
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    local f = all[j]
    if hk[f] == nil then
      local v = all[j + 1]
      hk[f] = tonumber(v) or v
    end
  end
  local gone, c, m = {}, 0, nil
  for f, v in pairs(hk) do
    if v then
      local p = sub(f, 1, 1)
      local s = nil
      if p == 'e' then
        s = tonumber(sub(f, 2))
        if v <= 0 then s = 0 end  -- no lease left in it
      elseif p == 'l' then
        s = tonumber(string.match(v, '%d+')) or 0  -- 's': settled, always gone
      end
      if s then
        if s * 100 <= now then
          gone[#gone + 1] = f
        else
          if p == 'e' then c = c + v end
          if not m or s < m then m = s end
        end
      end
    end
  end
  for j = 1, #gone do
    hk[gone[j]] = false
    dk[gone[j]] = true
  end
  hk.c, hk.m = c, m or false
  dk.c, dk.m = true, true
  if (hk.g or 0) > 0 then hk.g, dk.g = 0, true end
  if (hk.k or 0) > 0 then hk.k, dk.k = 0, true end
  return c, m
end

-- What each settlement and admission reads, so that each hash is read by one HMGET.
local kpos, apos = 0, 3
for _ = 1, nset do
  local n, sec = tonumber(ARGV[apos]), ARGV[apos + 2]
  want(KEYS[kpos + 1], 'l' .. ARGV[apos + 1])
  for i = 1, n do
    want(KEYS[kpos + i], 'e' .. sec)
  end
  kpos, apos = kpos + n, apos + 3 + 4 * n
end
local sapos = apos
if nadm > 0 then clock() end
for _ = 1, nadm do
  local n = tonumber(ARGV[apos])
  local esec = 'e' .. ceil((now + tonumber(ARGV[apos + 2])) / 100)
  want(KEYS[kpos + 1], 'l' .. ARGV[apos + 1])
  for i = 1, n do
    want(KEYS[kpos + i], esec)
  end
  kpos, apos = kpos + n, apos + 5 + 4 * n
end
for j = 1, #order do
  local key = order[j]
  local e = extra[key]
  local v = redis.call('HMGET', key, 'r', 'i', 'o', 'x', 'c', 'm', 'g', 'k', unpack(e))
  local hk = {r = tonumber(v[1]) or false, i = tonumber(v[2]) or false,
              o = tonumber(v[3]) or false, x = tonumber(v[4]) or false,
              c = tonumber(v[5]) or false, m = tonumber(v[6]) or false,
              g = tonumber(v[7]) or false, k = tonumber(v[8]) or false}
  for q = 1, #e do
    local s = v[8 + q]
    hk[e[q]] = tonumber(s) or s
  end
  h[key] = hk
  dirty[key] = {}
end

local function settle_one(kp, ap)
  local n, mfield = tonumber(ARGV[ap]), 'l' .. ARGV[ap + 1]
  local mv = h[KEYS[kp + 1]][mfield]
  if not mv or mv == 's' or sub(mv, 1, 1) == 'c' then
    return -1
  end
  local sec, mask = string.match(mv, '^(%d+)|(%d+)$')
  local esec = 'e' .. sec
  mask = tonumber(mask)
  local released = 0
  for i = 1, n do
    local key = KEYS[kp + i]
    local hk, dk = h[key], dirty[key]
    if hk[esec] == nil then  -- the tick was not known, or was renewed meanwhile
      hk[esec] = tonumber(redis.call('HGET', key, esec)) or false
    end
    local base = ap + 2 + (i - 1) * 4
    local need = 0
    for d = 2, 3 do
      local limit = tonumber(ARGV[base + d - 1])
      local delta = tonumber(ARGV[base + d + 1])
      local name = NAMES[d]
      local tat = hk[name]
      if limit > 0 and delta ~= 0 and (tat or delta > 0) then
        if delta > 0 and (not tat or tat < clock()) then tat = now end
        local new_tat = tat + delta * WINDOW / limit
        hk[name], dk[name] = new_tat, true
        if new_tat > need then need = new_tat end
      end
    end
    if floor(mask / 2 ^ (i - 1)) % 2 == 1 then
      local e = hk[esec]
      -- A bucket already swept (the lease expired) was taken off the count by the sweep.
      if e and e > 0 then
        hk[esec], dk[esec] = e - 1, true
        hk.c, dk.c = max((hk.c or 1) - 1, 0), true
        released = released + 1
      end
    end
    if i == 1 then
      hk[mfield], dk[mfield] = 's', true
      hk.g, dk.g = (hk.g or 0) + 1, true
    end
    expire_at(key, need)
  end
  return released
end

local function admit_one(kp, ap)
  local n, mfield = tonumber(ARGV[ap]), 'l' .. ARGV[ap + 1]
  local first = KEYS[kp + 1]
  if h[first][mfield] then
    return {2}
  end
  local sec = ceil((now + tonumber(ARGV[ap + 2])) / 100)
  local esec = 'e' .. sec
  local cin, cout = tonumber(ARGV[ap + 3]), tonumber(ARGV[ap + 4])
  B[1], B[2], B[3], B[4], B[5], B[6], B[7], B[8], B[9] = 0, -1, 0, 0, -1, 0, 0, -1, 0
  local mask = 0
  for i = 1, n do
    local hk = h[KEYS[kp + i]]
    local base = ap + 4 + (i - 1) * 4
    local q = (i - 1) * 7
    local need = 0
    for d = 1, 3 do
      local limit = tonumber(ARGV[base + d])
      local new_tat = false
      if limit > 0 then
        local T = WINDOW / limit
        local tat = hk[NAMES[d]] or now
        if tat < now then tat = now end
        local cost = d == 1 and 1 or (d == 2 and cin or cout)
        if cost > limit then cost = limit end
        new_tat = tat + cost * T
        -- Stored times may carry rounding error: compare with a slack of at most half a
        -- millisecond and half a unit, so a bucket filled within one millisecond still
        -- admits exactly `limit` units.
        local room = WINDOW + (T < 1 and T / 2 or 0.5)
        if new_tat - now > room then
          return {0, i, d, floor((new_tat - now - WINDOW) * 1000 + 0.5), limit,
                  max(floor((room - (tat - now)) / T), 0), floor((tat - now) * 1000 + 0.5)}
        end
        if new_tat > need then need = new_tat end
        local remaining = floor((room - (new_tat - now)) / T)
        local b = d * 3 - 2
        if B[b + 1] < 0 or remaining < B[b + 1] then
          B[b], B[b + 1], B[b + 2] = limit, remaining, new_tat - now
        end
      end
      P[q + d] = new_tat
    end
    local c, m = hk.c or 0, hk.m or nil
    local climit = tonumber(ARGV[base + 4])
    if (m and m * 100 <= now and ((climit > 0 and c >= climit) or m * 100 + 10000 <= now))
        or (hk.g or 0) >= 32 or (hk.k or 0) >= 32 then
      c, m = sweep(KEYS[kp + i])
    end
    if climit > 0 then
      if c >= climit then
        return {0, i, 4, 1000000, climit, 0, 1000000}
      end
      mask = mask + 2 ^ (i - 1)
    end
    if climit > 0 or i == 1 then
      if not m or sec < m then m = sec end
      if sec * 100 > need then need = sec * 100 end
    end
    P[q + 4], P[q + 5], P[q + 6], P[q + 7] = climit > 0, m or false, need, c
  end
  -- Every check passed: the writes.
  for i = 1, n do
    local key = KEYS[kp + i]
    local hk, dk = h[key], dirty[key]
    local q = (i - 1) * 7
    for d = 1, 3 do
      if P[q + d] then
        hk[NAMES[d]], dk[NAMES[d]] = P[q + d], true
      end
    end
    if P[q + 4] then
      local e = hk[esec]
      if not e then hk.k, dk.k = (hk.k or 0) + 1, true end
      hk[esec], dk[esec] = (e or 0) + 1, true
      hk.c, dk.c = P[q + 7] + 1, true
    end
    if P[q + 5] ~= hk.m then hk.m, dk.m = P[q + 5], true end
    expire_at(key, P[q + 6])
  end
  h[first][mfield], dirty[first][mfield] = sec .. '|' .. mask, true
  return {1, B[1], max(B[2], 0), floor(B[3] * 1000 + 0.5), B[4], max(B[5], 0),
          floor(B[6] * 1000 + 0.5), B[7], max(B[8], 0), floor(B[9] * 1000 + 0.5), sec}
end

local out = {}
kpos, apos = 0, 3
for j = 1, nset do
  out[j] = settle_one(kpos, apos)
  local n = tonumber(ARGV[apos])
  kpos, apos = kpos + n, apos + 3 + 4 * n
end
apos = sapos
for j = 1, nadm do
  out[nset + j] = admit_one(kpos, apos)
  local n = tonumber(ARGV[apos])
  kpos, apos = kpos + n, apos + 5 + 4 * n
end

-- The writes, each hash's deletions (a sweep's) and then its values.
local sets, dels = {}, {}
for j = 1, #order do
  local key = order[j]
  local hk = h[key]
  local ns, nd = 0, 0
  for f in pairs(dirty[key]) do
    local v = hk[f]
    if v then
      sets[ns + 1], sets[ns + 2] = f, v
      ns = ns + 2
    else
      nd = nd + 1
      dels[nd] = f
    end
  end
  for i = 1, nd, 1000 do
    redis.call('HDEL', key, unpack(dels, i, math.min(i + 999, nd)))
  end
  if ns > 0 then
    redis.call('HSET', key, unpack(sets, 1, ns))
  end
  if expire[key] then
    redis.call('PEXPIREAT', key, expire[key])
  end
end
return out
