-- Shared by every relay script (prepended by services/relay/redis_queues.py).
-- ARGV[1]: global key prefix; ARGV[2]: the queue's key base, prefix .. 'q:{tag}:', where
-- tag is an HMAC of the recipient (no user id in Redis); ARGV[3]: now in milliseconds,
-- or '' for Redis' own clock (replicas' clocks differ; tests pass a clock of their own).
--
-- Per queue: o (zset id -> seq, the order), m (hash id -> meta), d (hash id -> sealed
-- sender and time + body), x (zset id -> expiry), c (hash: n, cost), n (last seq),
-- seen (the recipient connected), i:<hmac> (idempotent sends).
-- Global: totals (hash: messages, bytes, cost, recipients), load:<sender hmac> (hash:
-- n, cost), due (zset queue -> its earliest expiry, for the sweep).
-- meta = 'seq expire_ms promised_expire_ms cost body_len sender_hmac'.
local P = ARGV[1]
local qb = ARGV[2]

local function now_ms()
  if ARGV[3] ~= '' then return tonumber(ARGV[3]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function parse(meta)
  local seq, exp, pexp, cost, len, s =
    string.match(meta, '^(%d+) (%d+) (%d+) (%d+) (%d+) (%x+)$')
  return tonumber(seq), tonumber(exp), tonumber(pexp), tonumber(cost), tonumber(len), s
end

local function format_meta(seq, exp, pexp, cost, len, s)
  return string.format('%d %d %d %d %d %s', seq, exp, pexp, cost, len, s)
end

-- Deletes one message and takes it off every count; 1 if it was there.
local function remove(id)
  local meta = redis.call('HGET', qb .. 'm', id)
  if not meta then return 0 end
  local _, _, _, cost, len, s = parse(meta)
  redis.call('HDEL', qb .. 'm', id)
  redis.call('HDEL', qb .. 'd', id)
  redis.call('ZREM', qb .. 'o', id)
  redis.call('ZREM', qb .. 'x', id)
  local totals = P .. 'totals'
  if redis.call('HINCRBY', qb .. 'c', 'n', -1) <= 0 then
    redis.call('DEL', qb .. 'c')
    redis.call('HINCRBY', totals, 'recipients', -1)
  else
    redis.call('HINCRBY', qb .. 'c', 'cost', -cost)
  end
  local load = P .. 'load:' .. s
  if redis.call('HINCRBY', load, 'n', -1) <= 0 then
    redis.call('DEL', load)
  else
    redis.call('HINCRBY', load, 'cost', -cost)
  end
  redis.call('HINCRBY', totals, 'messages', -1)
  redis.call('HINCRBY', totals, 'bytes', -len)
  redis.call('HINCRBY', totals, 'cost', -cost)
  return 1
end

-- Keeps the queue's place in the sweep's schedule at its earliest expiry.
local function reschedule()
  local first = redis.call('ZRANGE', qb .. 'x', 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('ZADD', P .. 'due', first[2], qb)
  else
    redis.call('ZREM', P .. 'due', qb)
  end
end
