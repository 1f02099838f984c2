-- Puts back a room's state that Redis lost, from what the database holds,
-- unless another node already did. A state without an epoch (a failover on
-- a Redis Cluster, see fence.lua) keeps its seq and released seq where they
-- are ahead of the database.
-- KEYS[1] room state hash   KEYS[2] room history sorted set
-- ARGV[1] epoch   ARGV[2] the highest seq the database holds
-- ARGV[3] the keys' time to live in ms ('0' for none)
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  local stored = tonumber(ARGV[2])
  local seq = math.max(tonumber(redis.call('HGET', KEYS[1], 'seq') or '0'), stored)
  local released = math.max(tonumber(redis.call('HGET', KEYS[1], 'released') or '0'), stored)
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', seq, 'released', released)
  redis.call('DEL', KEYS[2])
  if tonumber(ARGV[3]) > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
end
return redis.call('HGET', KEYS[1], 'epoch')
