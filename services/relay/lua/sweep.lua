-- Deletes expired messages from the queues due first; returns {deleted, queues seen}.
-- ARGV[2] is unused (the queues come from the schedule); ARGV[4]: most queues per call.
local now = now_ms()
local queues = redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', now, 'LIMIT', 0, ARGV[4])
local removed = 0
for _, queue in ipairs(queues) do
  qb = queue
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', qb .. 'x', '-inf', now)) do
    removed = removed + remove(id)
  end
  reschedule()
end
return {removed, #queues}
