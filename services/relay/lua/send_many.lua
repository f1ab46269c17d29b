-- Queues several messages, each to its own queue, all or none, and announces each.
-- ARGV[2] is unused (each message names its queue); ARGV[4..]: sender hmac, ttl ms,
-- unseen-recipient ttl ms, max queue messages, max queue bytes, max sender messages,
-- max sender bytes, max total bytes, smallest sender allowance, idempotency ms, count;
-- then per message: queue key base, id, body length, cost, data, idempotency hmac ('' for
-- none), channel.
-- Returns {'full', scope, position} (0-based; nothing queued) or {'done', r1, r2, ...}
-- with one 'ok seq expire_ms now_ms' or 'again id expire_ms now_ms' per message. The caps
-- are send.lua's (services.relay.queues.over_caps), counting the batch's earlier messages.
local s = ARGV[4]
local ttl, unseen = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_queue_messages, max_queue_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local max_sender_messages, max_sender_bytes = tonumber(ARGV[9]), tonumber(ARGV[10])
local max_total, floor = tonumber(ARGV[11]), tonumber(ARGV[12])
local idem_ms, count = tonumber(ARGV[13]), tonumber(ARGV[14])

local function arg(i, field) return ARGV[14 + (i - 1) * 7 + field] end

local totals = P .. 'totals'
local load = P .. 'load:' .. s
local total_cost = tonumber(redis.call('HGET', totals, 'cost') or 0)
local sender = redis.call('HMGET', load, 'n', 'cost')
local sent, sender_cost = tonumber(sender[1] or 0), tonumber(sender[2] or 0)
local added = {}
local repeats = {}

for i = 1, count do
  qb = arg(i, 1)
  local cost, idem = tonumber(arg(i, 4)), arg(i, 6)
  local first = false
  if idem ~= '' then first = redis.call('GET', qb .. 'i:' .. idem) end
  if first then
    repeats[i] = first
  else
    local queue = redis.call('HMGET', qb .. 'c', 'n', 'cost')
    local more = added[qb] or {0, 0}
    local queued = tonumber(queue[1] or 0) + more[1]
    local queue_cost = tonumber(queue[2] or 0) + more[2]
    if queued >= max_queue_messages or queue_cost + cost > max_queue_bytes then
      return {'full', 'recipient_queue', i - 1}
    end
    if sent > 0 then
      local allowance = max_sender_bytes
      local half = max_total / 2
      local free = max_total - total_cost
      if free < half then
        allowance = math.max(floor, math.floor(max_sender_bytes * free / half))
      end
      if sent >= max_sender_messages or sender_cost + cost > allowance then
        return {'full', 'sender', i - 1}
      end
    end
    if total_cost + cost > max_total then return {'full', 'relay_total', i - 1} end
    added[qb] = {more[1] + 1, more[2] + cost}
    sent = sent + 1
    sender_cost = sender_cost + cost
    total_cost = total_cost + cost
  end
end

local now = now_ms()
local out = {'done'}
for i = 1, count do
  qb = arg(i, 1)
  if repeats[i] then
    out[#out + 1] = 'again ' .. repeats[i]
  else
    local id, len, cost = arg(i, 2), tonumber(arg(i, 3)), tonumber(arg(i, 4))
    local data, idem, channel = arg(i, 5), arg(i, 6), arg(i, 7)
    local promised = now + ttl
    local expire = promised
    if redis.call('EXISTS', qb .. 'seen') == 0 then expire = math.min(expire, now + unseen) end
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
    out[#out + 1] = string.format('ok %d %d %d', seq, expire, now)
  end
end
return out
