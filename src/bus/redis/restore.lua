-- Puts back a room's state that Redis lost, from what the database holds,
-- unless another node already did.
-- KEYS[1] room state hash   KEYS[2] room history sorted set
-- ARGV[1] epoch   ARGV[2] the highest seq the database holds
-- ARGV[3] the keys' time to live in ms ('0' for none)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', ARGV[2], 'released', ARGV[2])
  redis.call('DEL', KEYS[2])
  if tonumber(ARGV[3]) > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
end
return redis.call('HGET', KEYS[1], 'epoch')
