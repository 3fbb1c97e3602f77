-- Admission: check and consume every limit of one request, all-or-nothing (docs/architecture.md §8).
-- KEYS: 4 per subject, in order: rpm bucket, itpm bucket, otpm bucket, concurrency zset,
--       then the admission marker (all of one request share the reseller's hash tag, so
--       this runs on one shard).
-- ARGV: [1] lease id (the admission id), [2] lease ttl ms, [3] input-token cost,
--       [4] output-token cost, then 4 limits per subject: rpm, itpm, otpm, concurrency
--       (0 = unlimited).
-- Returns: {1, <9 bucket values>} when admitted, {0, subject index (1-based), dimension index
--          (1 rpm, 2 itpm, 3 otpm, 4 concurrency), retry-after ms as a string, limit, remaining,
--          reset ms as a string} when refused (the refusing bucket as it stands), {2} when
--          this admission was cancelled before it ran (cancel.lua; nothing is consumed).
--          Bucket values: for rpm, itpm, otpm: limit, remaining, reset ms (string) of the
--          tightest subject (limit 0 when no subject limits that dimension).
-- Buckets are GCRA with a burst of the whole per-minute limit; time comes from the server.
-- The marker ('a', for the lease ttl) is what cancel.lua and settle.lua look at: a gateway
-- that gave up on this call (timeout) cancels it, whichever of the two runs first.
-- Nothing is written before the marker: a Redis out of memory refuses the script there,
-- whole (once a script has written, Redis lets it write on).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local WINDOW = 60000
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local costs = {1, tonumber(ARGV[3]), tonumber(ARGV[4])}
local n = (#KEYS - 1) / 4
local plan = {}
local best = {{0, -1, 0}, {0, -1, 0}, {0, -1, 0}}
for i = 1, n do
  for d = 1, 3 do
    local limit = tonumber(ARGV[4 + (i - 1) * 4 + d])
    if limit > 0 then
      local key = KEYS[(i - 1) * 4 + d]
      local T = WINDOW / limit
      local tat = tonumber(redis.call('GET', key) or now)
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
      plan[#plan + 1] = {key, new_tat}
      local remaining = math.floor((room - (new_tat - now)) / T)
      if best[d][2] < 0 or remaining < best[d][2] then
        best[d] = {limit, remaining, new_tat - now}
      end
    end
  end
  local climit = tonumber(ARGV[4 + (i - 1) * 4 + 4])
  if climit > 0 then
    local key = KEYS[(i - 1) * 4 + 4]
    if redis.call('ZCOUNT', key, '(' .. now, '+inf') >= climit then
      return {0, i, 4, '1000', climit, 0, '1000'}
    end
  end
end
if not redis.call('SET', KEYS[#KEYS], 'a', 'NX', 'PX', ttl) then
  return {2}
end
for _, p in ipairs(plan) do
  redis.call('SET', p[1], string.format('%.3f', p[2]), 'PX', math.ceil(p[2] - now) + 1000)
end
for i = 1, n do
  if tonumber(ARGV[4 + (i - 1) * 4 + 4]) > 0 then
    local key = KEYS[(i - 1) * 4 + 4]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    redis.call('ZADD', key, now + ttl, lease)
    -- Only ever extend the set's expiry: a short lease must not cut longer ones.
    if redis.call('PTTL', key) < ttl * 2 then redis.call('PEXPIRE', key, ttl * 2) end
  end
end
local out = {1}
for d = 1, 3 do
  out[#out + 1] = best[d][1]
  out[#out + 1] = math.max(best[d][2], 0)
  out[#out + 1] = string.format('%.3f', best[d][3])
end
return out
