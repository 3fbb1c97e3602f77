-- Store a new policy version atomically.
-- KEYS: [1] meta hash ({meta}), [2] policy hash ({meta}:policy).
-- ARGV: [1] canonical JSON document, [2] actor, [3] applied-at (epoch s), [4] expected live
--       version or '' for none.
-- Returns: {1, the new version}, or {0, the live version} when ARGV[4] differs (a conflict
--          is an answer, not an error: error replies mean the store failed).
local live = tonumber(redis.call('HGET', KEYS[1], 'policy_version') or '0')
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= live then
  return {0, live}
end
local v = live + 1
redis.call('HSET', KEYS[2], 'version', v, 'doc', ARGV[1], 'actor', ARGV[2], 'applied_at', ARGV[3])
redis.call('HSET', KEYS[1], 'policy_version', v)
return {1, v}
