-- Usage ledger: add one reseller's tallies to its day cells and its day/month totals, with the
-- models-per-day bound, all-or-nothing (docs/architecture.md §10, "The usage ledger").
-- KEYS: [1] the additions hash of this store instance and reseller (fields `applied` and
--       `cancelled`: the highest addition number each), then 4 per day of the cells: cells hash, models
--       set, day totals hash, month totals hash (all under the reseller's hash tag).
-- ARGV: [1] this addition's number (rising per store instance), [2] the additions hash's ttl s, [3] D (days), [4] the
--       reseller subject ("reseller:<R>"), [5] models per day, [6] the `other` model, then 3
--       per day: expire-at (Unix s) of its cells, of its day totals, of its month totals;
--       then the cell count and 8 per cell: day index (1-based), key subject ("key:<K>"),
--       model, field of the cell under its model, field under `other`, requests, input
--       tokens, output tokens.
-- Returns: 1 when added, 0 when this addition or a later one was already added, or it was
--          cancelled by resolve_usage.lua (its caller gave up on it: it must not apply when
--          it arrives late). The store sends one addition of a reseller at a time, the next
--          only once the last is known applied or cancelled, so any number not above those
--          seen is such a late one.
-- Cell fields: 'r:' / 'i:' / 'o:' followed by the JSON [key id, customer id, model]; totals
-- fields: the same letters followed by the subject.
-- Nothing is written before the HSET of `applied`: a Redis out of memory, or one refusing
-- writes, refuses the script whole (once a script has written, Redis lets it write on).
local id = tonumber(ARGV[1])
local marks = redis.call('HMGET', KEYS[1], 'applied', 'cancelled')
if id <= tonumber(marks[1] or '0') or id <= tonumber(marks[2] or '0') then
  return 0
end
redis.call('HSET', KEYS[1], 'applied', id)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local ndays = tonumber(ARGV[3])
local reseller = ARGV[4]
local maxmodels = tonumber(ARGV[5])
local other = ARGV[6]
local function incr(key, prefix, field, v)
  if tonumber(v) > 0 then
    redis.call('HINCRBY', key, prefix .. field, v)
  end
end
local touched = {}
local a = 7 + ndays * 3
local ncells = tonumber(ARGV[a])
for c = 0, ncells - 1 do
  local b = a + 1 + c * 8
  local day = tonumber(ARGV[b])
  local k = 2 + (day - 1) * 4  -- KEYS: cells hash, models set, day and month totals
  local model = ARGV[b + 2]
  local field = ARGV[b + 3]
  if model == other then
    field = ARGV[b + 4]
  elseif redis.call('SISMEMBER', KEYS[k + 1], model) == 0 then
    if redis.call('SCARD', KEYS[k + 1]) < maxmodels then
      redis.call('SADD', KEYS[k + 1], model)
    else
      field = ARGV[b + 4]
    end
  end
  for i, letter in ipairs({'r:', 'i:', 'o:'}) do
    local v = ARGV[b + 4 + i]
    incr(KEYS[k], letter, field, v)
    incr(KEYS[k + 2], letter, reseller, v)
    incr(KEYS[k + 2], letter, ARGV[b + 1], v)
    incr(KEYS[k + 3], letter, reseller, v)
    incr(KEYS[k + 3], letter, ARGV[b + 1], v)
  end
  touched[day] = true
end
for day in pairs(touched) do
  local k = 2 + (day - 1) * 4
  local e = 4 + day * 3
  redis.call('EXPIREAT', KEYS[k], ARGV[e])
  redis.call('EXPIREAT', KEYS[k + 1], ARGV[e])
  redis.call('EXPIREAT', KEYS[k + 2], ARGV[e + 1])
  redis.call('EXPIREAT', KEYS[k + 3], ARGV[e + 2])
end
return 1
