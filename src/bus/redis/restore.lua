-- Puts back a room's state that Redis lost, from what the database holds,
-- unless another node already did.
-- KEYS[1] room state hash   KEYS[2] room history sorted set
-- ARGV[1] epoch   ARGV[2] the highest seq the database holds
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', ARGV[2], 'released', ARGV[2])
  redis.call('DEL', KEYS[2])
end
return redis.call('HGET', KEYS[1], 'epoch')
