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
-- 10 s after the oldest tick passed, or once 256 settled markers or 256 new ticks piled up.
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
-- Commands: TIME (unless the call only refunds), one HMGET per hash the call reads (of all the fields its calls need) and
-- one HSET per hash it changes; a PEXPIREAT about once a minute per hash, and now and then a
-- sweep. Values are kept in Lua tables meanwhile (`h`), so a hash shared by several requests
-- of the call (their reseller's) is read and written once.
-- Nothing is written before every request of the call was decided. The first write is an
-- HDEL (allowed out of memory, and then so is the rest of the script) or an HSET: a Redis out
-- of memory refuses the call whole or not at all.
local WINDOW = 60000
local NAMES = {'r', 'i', 'o'}
local floor, min, max, ceil, tonumber = math.floor, math.min, math.max, math.ceil, tonumber
local nset, nadm = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = {}        -- key → {field → value read or written, false when absent}
local dirty = {}    -- key → {field → true} changed by this call
local expire = {}   -- key → the PEXPIREAT to send
local order = {}    -- keys in the order first seen
local want = {}     -- key → fields to read (the first pass)
local now = nil     -- the server's clock in ms, read once (a refund alone needs none)

local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
  end
  return now
end

local function ask(key, f)
  local w = want[key]
  if not w then
    w = {}
    want[key] = w
    order[#order + 1] = key
    h[key] = {}
    dirty[key] = {}
  end
  w[#w + 1] = f
end

local function read(key, fields)
  -- One HMGET of the fields of `key` not read yet.
  local hk, miss = h[key], {}
  for j = 1, #fields do
    if hk[fields[j]] == nil then miss[#miss + 1] = fields[j] end
  end
  if #miss > 0 then
    local v = redis.call('HMGET', key, unpack(miss))
    for j = 1, #miss do hk[miss[j]] = v[j] or false end
  end
end

local function put(key, f, v)
  h[key][f] = v
  dirty[key][f] = true
end

local function expire_at(key, need)
  -- Set the expiry a minute beyond what is needed, so it is set again only that often.
  local x = tonumber(h[key].x)
  if need > 0 and (not x or need + 1000 > x) then
    expire[key] = ceil(need) + 1000 + WINDOW
    put(key, 'x', expire[key])
  end
end

local function sweep(key)
  -- Drop expired and emptied lease ticks and gone markers; recount the live leases, the
  -- lower bound and the ticks left.
  local hk = h[key]
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    if hk[all[j]] == nil then hk[all[j]] = all[j + 1] end
  end
  local gone, c, m = {}, 0, nil
  for f, v in pairs(hk) do
    if v then
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
  end
  for j = 1, #gone do put(key, gone[j], false) end
  put(key, 'c', c)
  put(key, 'm', m or false)
  if (tonumber(hk.g) or 0) > 0 then put(key, 'g', 0) end
  if (tonumber(hk.k) or 0) > 0 then put(key, 'k', 0) end
  return c, m
end

local function us(ms)
  return floor(ms * 1000 + 0.5)
end

-- The first pass: what each call reads, so that each hash is read with one HMGET.
local kpos, apos = 0, 3
for _ = 1, nset do
  local n, lease, sec = tonumber(ARGV[apos]), ARGV[apos + 1], ARGV[apos + 2]
  for i = 1, n do
    local key = KEYS[kpos + i]
    ask(key, 'i'); ask(key, 'o'); ask(key, 'x'); ask(key, 'c'); ask(key, 'e' .. sec)
  end
  ask(KEYS[kpos + 1], 'l' .. lease)
  ask(KEYS[kpos + 1], 'g')
  kpos, apos = kpos + n, apos + 3 + 4 * n
end
local sapos = apos
if nadm > 0 then clock() end
for _ = 1, nadm do
  local n, lease, ttl = tonumber(ARGV[apos]), ARGV[apos + 1], tonumber(ARGV[apos + 2])
  local esec = 'e' .. ceil((now + ttl) / 100)
  for i = 1, n do
    local key = KEYS[kpos + i]
    ask(key, 'r'); ask(key, 'i'); ask(key, 'o'); ask(key, 'x'); ask(key, 'c'); ask(key, 'm')
    ask(key, esec); ask(key, 'g'); ask(key, 'k')
  end
  ask(KEYS[kpos + 1], 'l' .. lease)
  kpos, apos = kpos + n, apos + 5 + 4 * n
end
for j = 1, #order do read(order[j], want[order[j]]) end

local function settle_one(kp, ap)
  local n, mfield, sec = tonumber(ARGV[ap]), 'l' .. ARGV[ap + 1], tonumber(ARGV[ap + 2])
  local first = KEYS[kp + 1]
  local mv = h[first][mfield]
  if not mv or mv == 's' or string.sub(mv, 1, 1) == 'c' then
    return -1
  end
  local msec, mask = string.match(mv, '^(%d+)|(%d+)$')
  sec, mask = tonumber(msec), tonumber(mask)
  local esec = 'e' .. sec
  local released = 0
  for i = 1, n do
    local key = KEYS[kp + i]
    read(key, {esec})  -- when the tick was not known or was renewed meanwhile
    local hk = h[key]
    local base = ap + 2 + (i - 1) * 4
    local need = 0
    for d = 2, 3 do
      local limit = tonumber(ARGV[base + d - 1])
      local delta = tonumber(ARGV[base + d + 1])
      local tat = tonumber(hk[NAMES[d]])
      if limit > 0 and delta ~= 0 and (tat or delta > 0) then
        if delta > 0 and (not tat or tat < clock()) then tat = now end
        local new_tat = tat + delta * WINDOW / limit
        put(key, NAMES[d], new_tat)
        if new_tat > need then need = new_tat end
      end
    end
    if floor(mask / 2 ^ (i - 1)) % 2 == 1 then
      local e = tonumber(hk[esec])
      -- A bucket already swept (the lease expired) was taken off the count by the sweep.
      if e and e > 0 then
        put(key, esec, e - 1)
        put(key, 'c', max((tonumber(hk.c) or 1) - 1, 0))
        released = released + 1
      end
    end
    if i == 1 then
      put(key, mfield, 's')
      put(key, 'g', (tonumber(hk.g) or 0) + 1)
    end
    expire_at(key, need)
  end
  return released
end

local function admit_one(kp, ap)
  local n, lease, ttl = tonumber(ARGV[ap]), ARGV[ap + 1], tonumber(ARGV[ap + 2])
  local costs = {1, tonumber(ARGV[ap + 3]), tonumber(ARGV[ap + 4])}
  local mfield = 'l' .. lease
  if h[KEYS[kp + 1]][mfield] then
    return {2}
  end
  local sec = ceil((now + ttl) / 100)
  local esec = 'e' .. sec
  local best = {0, -1, 0, 0, -1, 0, 0, -1, 0}  -- limit, remaining, reset per dimension
  local plan = {}  -- per subject: {tats (3), c, m, k, need}, written once all checks passed
  local mask = 0
  for i = 1, n do
    local key = KEYS[kp + i]
    local hk = h[key]
    local base = ap + 4 + (i - 1) * 4
    local p = {false, false, false}
    local need = 0
    for d = 1, 3 do
      local limit = tonumber(ARGV[base + d])
      if limit > 0 then
        local T = WINDOW / limit
        local tat = tonumber(hk[NAMES[d]]) or now
        if tat < now then tat = now end
        local new_tat = tat + min(costs[d], limit) * T
        -- Stored times may carry rounding error: compare with a slack of at most half a
        -- millisecond and half a unit, so a bucket filled within one millisecond still
        -- admits exactly `limit` units.
        local room = WINDOW + min(0.5, T / 2)
        if new_tat - now > room then
          return {0, i, d, us(new_tat - now - WINDOW), limit,
                  max(floor((room - (tat - now)) / T), 0), us(tat - now)}
        end
        p[d] = new_tat
        if new_tat > need then need = new_tat end
        local remaining = floor((room - (new_tat - now)) / T)
        local b = (d - 1) * 3
        if best[b + 2] < 0 or remaining < best[b + 2] then
          best[b + 1], best[b + 2], best[b + 3] = limit, remaining, new_tat - now
        end
      end
    end
    local c = tonumber(hk.c) or 0
    local m = tonumber(hk.m)
    local climit = tonumber(ARGV[base + 4])
    if (m and m * 100 <= now and ((climit > 0 and c >= climit) or m * 100 + 10000 <= now))
        or (tonumber(hk.g) or 0) >= 256 or (tonumber(hk.k) or 0) >= 256 then
      c, m = sweep(key)
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
    p[4], p[5], p[6], p[7] = climit > 0, m, need, c
    plan[i] = p
  end
  for i = 1, n do
    local key, p = KEYS[kp + i], plan[i]
    local hk = h[key]
    for d = 1, 3 do
      if p[d] then put(key, NAMES[d], p[d]) end
    end
    if p[4] then
      if not hk[esec] then put(key, 'k', (tonumber(hk.k) or 0) + 1) end
      put(key, esec, (tonumber(hk[esec]) or 0) + 1)
      put(key, 'c', p[7] + 1)
    end
    if p[5] ~= tonumber(hk.m) then put(key, 'm', p[5]) end
    expire_at(key, p[6])
  end
  put(KEYS[kp + 1], mfield, sec .. '|' .. mask)
  local out = {1}
  for j = 1, 9, 3 do
    out[#out + 1] = best[j]
    out[#out + 1] = max(best[j + 1], 0)
    out[#out + 1] = us(best[j + 2])
  end
  out[#out + 1] = sec
  return out
end

local out = {}
kpos, apos = 0, 3
for _ = 1, nset do
  out[#out + 1] = settle_one(kpos, apos)
  local n = tonumber(ARGV[apos])
  kpos, apos = kpos + n, apos + 3 + 4 * n
end
apos = sapos
for _ = 1, nadm do
  out[#out + 1] = admit_one(kpos, apos)
  local n = tonumber(ARGV[apos])
  kpos, apos = kpos + n, apos + 5 + 4 * n
end

-- The writes, each hash's deletions (a sweep's) and then its values.
for j = 1, #order do
  local key = order[j]
  local hk, sets, dels = h[key], {}, {}
  for f in pairs(dirty[key]) do
    local v = hk[f]
    if v then
      sets[#sets + 1] = f
      sets[#sets + 1] = v
    else
      dels[#dels + 1] = f
    end
  end
  for i = 1, #dels, 1000 do
    redis.call('HDEL', key, unpack(dels, i, min(i + 999, #dels)))
  end
  if #sets > 0 then
    redis.call('HSET', key, unpack(sets))
  end
  if expire[key] then
    redis.call('PEXPIREAT', key, expire[key])
  end
end
return out
