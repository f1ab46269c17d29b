-- A sliding-window limit, exact across replicas (services/common/shared_state.py).
-- KEYS[1]: a sorted set of event times (ms). ARGV: limit, window ms, now ms ('' for
-- Redis' own clock), mode: 'check' (wait if over), 'acquire' (record if not over),
-- 'hit' (record regardless), 'reset' (forget every event).
-- Returns the milliseconds to wait, or -1 when the caller may act (or after hit/reset).
local key = KEYS[1]
local limit, window, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[4]
if mode == 'reset' then
  redis.call('DEL', key)
  return -1
end
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if mode ~= 'hit' and count >= limit then
  -- Allowed again when the oldest of the newest `limit` events leaves the window.
  local oldest = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
if mode == 'check' then return -1 end
-- Members must be distinct: the time and a counter that only grows within this set.
local serial = redis.call('HINCRBY', key .. ':serial', 'n', 1)
redis.call('ZADD', key, now, string.format('%d:%d', now, serial))
if count + 1 > limit then redis.call('ZREMRANGEBYRANK', key, 0, count - limit) end
redis.call('PEXPIRE', key, window)
redis.call('PEXPIRE', key .. ':serial', window)
return -1
