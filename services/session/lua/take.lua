-- Takes a challenge: GETDEL, so across every replica it is redeemed at most once.
-- ARGV: prefix, challenge id. Returns its value, or false if unknown, used or expired.
local P, id = ARGV[1], ARGV[2]
local value = redis.call('GETDEL', P .. 'ch:' .. id)
if not value then return false end
local group = string.match(value, '^%x+ %x+ (%x+)$')
redis.call('ZREM', P .. 'challenges', id)
if group then redis.call('ZREM', P .. 'held:' .. group, id) end
return value
