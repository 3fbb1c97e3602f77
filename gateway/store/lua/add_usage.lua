-- Usage ledger: add one reseller's tallies to its day cells and its day/month totals, with the
-- models-per-day bound, all-or-nothing (docs/architecture.md §10, "The usage ledger").
-- KEYS: [1] this addition's marker, [2 .. 1+P] the markers of the P earlier additions of
--       this reseller still in doubt (oldest first), then 4 per day of the cells: cells hash,
--       models set, day totals hash, month totals hash (all under the reseller's hash tag).
-- ARGV: [1] marker ttl s, [2] P, [3] D (days), [4] the reseller subject ("reseller:<R>"),
--       [5] models per day, [6] the `other` model, then 3 per day: expire-at (Unix s) of its
--       cells, of its day totals, of its month totals; then per addition in doubt: its cell
--       count and 4 per cell: cell id, requests, input tokens, output tokens; then this
--       addition's cell count and 9 per cell: day index (1-based), key subject ("key:<K>"),
--       cell id, model, field of the cell under its model, field under `other`, requests,
--       input tokens, output tokens.
-- Returns: 1 when added, 0 when this addition was already added or cancelled (a later one
--          found it in doubt and made it a no-op).
-- Cell fields: 'r:' / 'i:' / 'o:' followed by the JSON [key id, customer id, model]; totals
-- fields: the same letters followed by the subject. An addition in doubt (its caller saw a
-- timeout) may have been applied: the newest one that was is what the caller's retried tally
-- already holds, so that much is subtracted here; those that were not are marked cancelled.
-- Nothing is written before the first SET: a Redis out of memory refuses the script whole.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local ttl = tonumber(ARGV[1])
local npend = tonumber(ARGV[2])
local ndays = tonumber(ARGV[3])
local reseller = ARGV[4]
local maxmodels = tonumber(ARGV[5])
local other = ARGV[6]
local a = 7 + ndays * 3
-- The newest addition in doubt that was applied: its cells are already counted.
local applied = 0
local cancel = {}
for j = 1, npend do
  if redis.call('GET', KEYS[1 + j]) == 'a' then
    applied = j
    cancel = {}
  else
    cancel[#cancel + 1] = KEYS[1 + j]
  end
end
local counted = {}
for j = 1, npend do
  local n = tonumber(ARGV[a])
  a = a + 1
  if j == applied then
    for c = 0, n - 1 do
      local b = a + c * 4
      counted[ARGV[b]] = {tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])}
    end
  end
  a = a + n * 4
end
redis.call('SET', KEYS[1], 'a', 'EX', ttl)
for _, k in ipairs(cancel) do
  redis.call('SET', k, 'c', 'EX', ttl, 'NX')
end
local function incr(key, prefix, field, v)
  if v > 0 then
    redis.call('HINCRBY', key, prefix .. field, string.format('%d', v))
  end
end
local touched = {}
local ncells = tonumber(ARGV[a])
a = a + 1
for c = 0, ncells - 1 do
  local b = a + c * 9
  local day = tonumber(ARGV[b])
  local v = {tonumber(ARGV[b + 6]), tonumber(ARGV[b + 7]), tonumber(ARGV[b + 8])}
  local done = counted[ARGV[b + 2]]
  if done then
    for i = 1, 3 do
      v[i] = math.max(0, v[i] - done[i])
    end
  end
  if v[1] > 0 or v[2] > 0 or v[3] > 0 then
    local k = 2 + npend + (day - 1) * 4  -- KEYS: cells hash, models, day and month totals
    local model = ARGV[b + 3]
    local field = ARGV[b + 4]
    if model == other then
      field = ARGV[b + 5]
    elseif redis.call('SISMEMBER', KEYS[k + 1], model) == 0 then
      if redis.call('SCARD', KEYS[k + 1]) < maxmodels then
        redis.call('SADD', KEYS[k + 1], model)
      else
        field = ARGV[b + 5]
      end
    end
    for i, letter in ipairs({'r:', 'i:', 'o:'}) do
      incr(KEYS[k], letter, field, v[i])
      incr(KEYS[k + 2], letter, reseller, v[i])
      incr(KEYS[k + 2], letter, ARGV[b + 1], v[i])
      incr(KEYS[k + 3], letter, reseller, v[i])
      incr(KEYS[k + 3], letter, ARGV[b + 1], v[i])
    end
    touched[day] = true
  end
end
for day in pairs(touched) do
  local k = 2 + npend + (day - 1) * 4
  local e = 4 + day * 3
  redis.call('EXPIREAT', KEYS[k], ARGV[e])
  redis.call('EXPIREAT', KEYS[k + 1], ARGV[e])
  redis.call('EXPIREAT', KEYS[k + 2], ARGV[e + 1])
  redis.call('EXPIREAT', KEYS[k + 3], ARGV[e + 2])
end
return 1
