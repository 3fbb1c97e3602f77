-- Settlement: correct token buckets from reserved to actual usage and release the lease.
-- KEYS: 3 per subject: itpm bucket, otpm bucket, concurrency zset, then the admission
--       marker (one reseller's hash tag).
-- ARGV: [1] lease id, [2] marker ttl ms, then 4 per subject: itpm limit, otpm limit, input
--       delta, output delta (delta = actual - reserved, in tokens; negative refunds, never
--       below a full bucket).
-- Returns: the number of leases released, or -1 when this admission was already settled or
--          cancelled (a retried settlement applies once).
local prev = redis.call('SET', KEYS[#KEYS], 's', 'PX', tonumber(ARGV[2]), 'GET')
if prev == 's' or prev == 'c' then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local WINDOW = 60000
local released = 0
local n = (#KEYS - 1) / 3
for i = 1, n do
  for d = 1, 2 do
    local limit = tonumber(ARGV[2 + (i - 1) * 4 + d])
    local delta = tonumber(ARGV[2 + (i - 1) * 4 + 2 + d])
    if limit > 0 and delta ~= 0 then
      local key = KEYS[(i - 1) * 3 + d]
      local tat = tonumber(redis.call('GET', key) or now)
      if tat < now then tat = now end
      local new_tat = tat + delta * WINDOW / limit
      if new_tat <= now then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
      end
    end
  end
  released = released + redis.call('ZREM', KEYS[(i - 1) * 3 + 3], ARGV[1])
end
return released
