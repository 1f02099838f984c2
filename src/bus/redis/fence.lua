-- Redis Cluster only: runs first in the publish and snapshot scripts.
-- A room's state remembers the cluster node that last served it (CLUSTER
-- MYID). When another node serves it now, either its slot was migrated (the
-- old node is still a healthy primary: the keys moved whole, nothing to do)
-- or a replica was promoted after its primary failed. A promoted replica
-- cannot tell whether it missed the last writes its primary acked, so the
-- room starts a new epoch there: no seq can repeat within an epoch. With a
-- database (FENCE_PERSISTED, set by the node) the room's epoch is dropped
-- instead, and its seq kept: the scripts answer NOSTATE, and the node puts
-- the room back from the database (restore.lua), past both the seq kept here
-- (the stream may still hold messages up to it, not yet written) and the
-- highest stored (the old primary's writes may have reached the database).
-- KEYS[1] room state hash   KEYS[2] room history sorted set
do
  local me = redis.call('CLUSTER', 'MYID')
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner ~= me and redis.call('HEXISTS', KEYS[1], 'epoch') == 1 then
    if owner then
      local moved = false
      for line in string.gmatch(redis.call('CLUSTER', 'NODES'), '[^\n]+') do
        local id, _, flags = string.match(line, '^(%S+) (%S+) (%S+)')
        if id == owner then
          moved = string.find(flags, 'master', 1, true) ~= nil and string.find(flags, 'fail', 1, true) == nil
        end
      end
      if not moved then
        if FENCE_PERSISTED then
          redis.call('HDEL', KEYS[1], 'epoch')
          redis.call('DEL', KEYS[2])
        else
          local t = redis.call('TIME')
          redis.call('DEL', KEYS[1], KEYS[2])
          redis.call('HSET', KEYS[1], 'epoch', string.sub(me, 1, 8) .. t[1] .. t[2], 'seq', 0)
        end
      end
    end
    redis.call('HSET', KEYS[1], 'owner', me)
  end
end
