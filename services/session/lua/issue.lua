-- Issues one login challenge if the book has room (services/session/redis_challenges.py).
-- KEYS: none (single Redis primary). ARGV: prefix, challenge id, value, ttl ms,
-- group tag, capacity, per-group allowance, now ms ('' for Redis' own clock).
-- Returns 'ok', 'full' (the whole book) or 'group' (this address group holds too many).
local P, id, value, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local group, capacity, per_group = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local now
if ARGV[8] ~= '' then
  now = tonumber(ARGV[8])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local book, held = P .. 'challenges', P .. 'held:' .. group
redis.call('ZREMRANGEBYSCORE', book, '-inf', now)
redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
local outstanding = redis.call('ZCARD', book)
if outstanding >= capacity then return 'full' end
-- Past half full, each group's allowance shrinks with the free space (never below one).
local allowance = per_group
local half, free = capacity / 2, capacity - outstanding
if free < half then allowance = math.max(1, math.floor(per_group * free / half)) end
if redis.call('ZCARD', held) >= allowance then return 'group' end
-- SET NX: a challenge id is issued once; it lives exactly its TTL on Redis' clock.
if not redis.call('SET', P .. 'ch:' .. id, value, 'PX', ttl, 'NX') then return 'full' end
redis.call('ZADD', book, now + ttl, id)
redis.call('ZADD', held, now + ttl, id)
redis.call('PEXPIRE', held, ttl)
return 'ok'
