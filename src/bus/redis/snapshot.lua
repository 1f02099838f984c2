-- A room's seq and epoch, and the messages after a seq, read atomically.
-- KEYS[1] room state hash   KEYS[2] room history sorted set
-- ARGV[1] a fresh epoch for a room that has none   ARGV[2] since ('' for none)
-- ARGV[3] whether a database keeps history ('1' or '0')
-- ARGV[4] the field of the room's latest seq: 'seq', or 'released' with --durable-acks
-- ARGV[5] the keys' time to live in ms ('0' for none), renewed by a join
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  if ARGV[3] == '1' then
    return redis.error_reply('NOSTATE room state is gone')
  end
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
  redis.call('DEL', KEYS[2])
end
if tonumber(ARGV[5]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
-- With --durable-acks only released (committed) messages count.
local seq = tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or '0')
local messages = {}
if ARGV[2] ~= '' then
  messages = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '+inf', 'WITHSCORES')
end
return {seq, epoch, messages}
