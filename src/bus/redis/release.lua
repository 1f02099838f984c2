-- With --durable-acks: makes a message that the database now holds visible,
-- once: keeps it in the room's history, publishes it, and tells the node
-- that published it that it may ack.
-- KEYS[1] room state hash   KEYS[2] room history sorted set
-- ARGV: channel, history size, seq, epoch, message JSON, ack channel, request id,
--       the keys' time to live in ms ('0' for none), the command that
--       publishes ('PUBLISH', or 'SPUBLISH' on a Redis Cluster, where the
--       ack channel is a shard channel in the room's slot)
local seq, size = tonumber(ARGV[3]), tonumber(ARGV[2])
if size > 0 then
  redis.call('ZADD', KEYS[2], seq, ARGV[5])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(size + 1))
end
if tonumber(redis.call('HGET', KEYS[1], 'released') or '0') < seq then
  redis.call('HSET', KEYS[1], 'released', seq)
end
if tonumber(ARGV[8]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
redis.call(ARGV[9], ARGV[1], ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. ARGV[5])
redis.call(ARGV[9], ARGV[6], ARGV[7])
return 1
