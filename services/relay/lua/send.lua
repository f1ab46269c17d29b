-- Queues one message if every cap allows, and announces it, all at once.
-- ARGV[4..]: id, sender hmac, body length, cost, ttl ms, unseen-recipient ttl ms, data,
-- max queue messages, max queue bytes, max sender messages, max sender bytes,
-- max total bytes, smallest sender allowance, idempotency hmac ('' for none),
-- idempotency ms, channel.
-- Returns {'ok', seq, expire_ms, now_ms}, {'again', 'id expire_ms now_ms'} for a repeated
-- client_message_id, or {'full', scope}. The caps are the ones of
-- services.relay.queues.over_caps, in the same order.
local id, s = ARGV[4], ARGV[5]
local len, cost = tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl, unseen = tonumber(ARGV[8]), tonumber(ARGV[9])
local data = ARGV[10]
local max_queue_messages, max_queue_bytes = tonumber(ARGV[11]), tonumber(ARGV[12])
local max_sender_messages, max_sender_bytes = tonumber(ARGV[13]), tonumber(ARGV[14])
local max_total, floor = tonumber(ARGV[15]), tonumber(ARGV[16])
local idem, idem_ms, channel = ARGV[17], tonumber(ARGV[18]), ARGV[19]

if idem ~= '' then
  local first = redis.call('GET', qb .. 'i:' .. idem)
  if first then return {'again', first} end
end

local queue = redis.call('HMGET', qb .. 'c', 'n', 'cost')
local queued, queue_cost = tonumber(queue[1] or 0), tonumber(queue[2] or 0)
if queued >= max_queue_messages or queue_cost + cost > max_queue_bytes then
  return {'full', 'recipient_queue'}
end
local totals = P .. 'totals'
local total_cost = tonumber(redis.call('HGET', totals, 'cost') or 0)
local load = P .. 'load:' .. s
local sender = redis.call('HMGET', load, 'n', 'cost')
local sent, sender_cost = tonumber(sender[1] or 0), tonumber(sender[2] or 0)
if sent > 0 then
  local allowance = max_sender_bytes
  local half = max_total / 2
  local free = max_total - total_cost
  if free < half then
    allowance = math.max(floor, math.floor(max_sender_bytes * free / half))
  end
  if sent >= max_sender_messages or sender_cost + cost > allowance then
    return {'full', 'sender'}
  end
end
if total_cost + cost > max_total then return {'full', 'relay_total'} end

local now = now_ms()
local promised = now + ttl
local expire = promised
if redis.call('EXISTS', qb .. 'seen') == 0 then expire = math.min(expire, now + unseen) end
-- Seqs only grow: from the last one, or from the clock (in microseconds) if that is
-- further on, so a counter that lapsed with an idle queue still starts above every
-- cursor an open stream may hold.
local seq = math.max(tonumber(redis.call('GET', qb .. 'n') or 0) + 1, now * 1000)
redis.call('SET', qb .. 'n', string.format('%d', seq), 'PX', ttl + 86400000)

redis.call('HSET', qb .. 'm', id, format_meta(seq, expire, promised, cost, len, s))
redis.call('HSET', qb .. 'd', id, data)
redis.call('ZADD', qb .. 'o', seq, id)
redis.call('ZADD', qb .. 'x', expire, id)
if redis.call('HINCRBY', qb .. 'c', 'n', 1) == 1 then
  redis.call('HINCRBY', totals, 'recipients', 1)
end
redis.call('HINCRBY', qb .. 'c', 'cost', cost)
redis.call('HINCRBY', load, 'n', 1)
redis.call('HINCRBY', load, 'cost', cost)
redis.call('HINCRBY', totals, 'messages', 1)
redis.call('HINCRBY', totals, 'bytes', len)
redis.call('HINCRBY', totals, 'cost', cost)
redis.call('ZADD', P .. 'due', 'LT', expire, qb)
if idem ~= '' then
  local remembered = string.format('%s %d %d', id, expire, now)
  redis.call('SET', qb .. 'i:' .. idem, remembered, 'PX', math.min(idem_ms, ttl))
end
redis.call('SPUBLISH', channel, string.format('%d', seq))
return {'ok', string.format('%d', seq), string.format('%d', expire), string.format('%d', now)}
