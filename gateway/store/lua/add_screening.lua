-- Reseller screening: add one reseller's tallies of some UTC hours (docs/architecture.md §15).
-- KEYS: 7 per hour, all under the reseller's hash tag: counters hash, customers HyperLogLog,
--       names hash, then the pair sets cc, ip, kc, ka.
-- ARGV: [1] the cap of a pair set, then per hour: its expire-at (Unix s) and its tally as
--       JSON {"c": {counter: n}, "u": [customer ids], "n": {asn: name},
--             "p": {"cc": [...], "ip": [...], "kc": [...], "ka": [...]}}.
-- A pair set takes members while it holds fewer than the cap; every key gets the expiry.
local cap = tonumber(ARGV[1])
local kinds = {"cc", "ip", "kc", "ka"}
local hours = #KEYS / 7
for h = 1, hours do
  local base = (h - 1) * 7
  local expires = tonumber(ARGV[2 * h])
  local t = cjson.decode(ARGV[2 * h + 1])
  for name, n in pairs(t["c"] or {}) do
    redis.call("HINCRBY", KEYS[base + 1], name, n)
  end
  redis.call("EXPIREAT", KEYS[base + 1], expires)
  local u = t["u"] or {}
  if #u > 0 then
    for i = 1, #u, 500 do
      redis.call("PFADD", KEYS[base + 2], unpack(u, i, math.min(i + 499, #u)))
    end
    redis.call("EXPIREAT", KEYS[base + 2], expires)
  end
  for asn, name in pairs(t["n"] or {}) do
    redis.call("HSET", KEYS[base + 3], asn, name)
  end
  -- Names added now or by an earlier addition; on a missing key EXPIREAT does nothing.
  redis.call("EXPIREAT", KEYS[base + 3], expires)
  local p = t["p"] or {}
  for k = 1, 4 do
    local members = p[kinds[k]] or {}
    local key = KEYS[base + 3 + k]
    if #members > 0 then
      local room = cap - redis.call("SCARD", key)
      for i = 1, #members do
        if room <= 0 then break end
        room = room - redis.call("SADD", key, members[i])
      end
      redis.call("EXPIREAT", key, expires)
    end
  end
end
return hours
