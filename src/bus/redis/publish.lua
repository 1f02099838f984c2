-- Gives a message its seq, keeps it in the room's capped history and
-- publishes it, atomically, so every node sees messages in seq order.
-- KEYS[1] room state hash (seq, epoch)   KEYS[2] room history sorted set
-- ARGV: channel, history size, room, from (JSON string), ts, body (JSON),
--       a fresh epoch to start if the room's state is gone
local state, history = KEYS[1], KEYS[2]
local channel, size = ARGV[1], tonumber(ARGV[2])
local epoch = redis.call('HGET', state, 'epoch')
if not epoch then
  -- New room, or Redis lost it: a new epoch, and no history from the old one.
  epoch = ARGV[7]
  redis.call('HSET', state, 'epoch', epoch)
  redis.call('DEL', history)
end
local seq = redis.call('HINCRBY', state, 'seq', 1)
local message = '{"type":"message","room":"' .. ARGV[3] .. '","seq":' .. seq ..
  ',"from":' .. ARGV[4] .. ',"ts":' .. ARGV[5] .. ',"body":' .. ARGV[6] .. '}'
if size > 0 then
  redis.call('ZADD', history, seq, message)
  redis.call('ZREMRANGEBYRANK', history, 0, -(size + 1))
end
redis.call('PUBLISH', channel, seq .. ' ' .. epoch .. ' ' .. message)
return {seq, epoch}
