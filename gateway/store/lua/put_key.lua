-- Create or replace a key record and bump the keys epoch in one step.
-- KEYS: [1] meta hash ({meta}), [2] keys hash ({meta}:keys).
-- ARGV: [1] key id, [2] record JSON (hashes only, never a secret).
-- Returns: the new keys epoch.
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'keys_epoch', 1)
