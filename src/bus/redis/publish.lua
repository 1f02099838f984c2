-- Gives a message its seq, keeps it in the room's capped history and
-- publishes it, atomically, so every node sees messages in seq order.
-- KEYS[1] room state hash (seq, epoch)   KEYS[2] room history sorted set
-- KEYS[3] the stream of messages still to be written to the database
-- ARGV: channel, history size, room, from (JSON string), ts, body (JSON),
--       a fresh epoch for a room that has no state, whether a database
--       keeps history ('1' or '0'), the most messages the stream may hold,
--       and with --durable-acks the publishing node and its request id
--       (else ''). A durable message is only queued for the database here:
--       the writer releases it (history, PUBLISH, ack) once committed.
--       ARGV[12]: the keys' time to live in ms ('0' for none): every
--       publish renews it, so only a room idle that long expires.
--       ARGV[13]: the command that publishes ('PUBLISH', or 'SPUBLISH' on
--       a Redis Cluster).
local state, history, pending = KEYS[1], KEYS[2], KEYS[3]
local channel, size, persist = ARGV[1], tonumber(ARGV[2]), ARGV[8] == '1'
local ttl = tonumber(ARGV[12])
local function renew()
  if ttl > 0 then
    redis.call('PEXPIRE', state, ttl)
    redis.call('PEXPIRE', history, ttl)
  end
end
local epoch = redis.call('HGET', state, 'epoch')
if not epoch then
  if persist then
    -- The database knows where the room's sequence stands: ask the node.
    return redis.error_reply('NOSTATE room state is gone')
  end
  -- New room, or Redis lost it: a new epoch, and no history from the old one.
  epoch = ARGV[7]
  redis.call('HSET', state, 'epoch', epoch)
  redis.call('DEL', history)
end
if persist and redis.call('XLEN', pending) >= tonumber(ARGV[9]) then
  return redis.error_reply('QUEUEFULL the database write queue is full')
end
local seq = redis.call('HINCRBY', state, 'seq', 1)
local message = '{"type":"message","room":"' .. ARGV[3] .. '","seq":' .. seq ..
  ',"from":' .. ARGV[4] .. ',"ts":' .. ARGV[5] .. ',"body":' .. ARGV[6] .. '}'
if ARGV[10] ~= '' then
  redis.call('XADD', pending, '*', 'r', ARGV[3], 'e', epoch, 'm', message, 'n', ARGV[10], 'q', ARGV[11])
  renew()
  return {seq, epoch}
end
if size > 0 then
  redis.call('ZADD', history, seq, message)
  redis.call('ZREMRANGEBYRANK', history, 0, -(size + 1))
end
if persist then
  redis.call('XADD', pending, '*', 'r', ARGV[3], 'e', epoch, 'm', message)
end
redis.call(ARGV[13], channel, seq .. ' ' .. epoch .. ' ' .. message)
renew()
return {seq, epoch}
