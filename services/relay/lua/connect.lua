-- The recipient connected: from now on (while remembered) their messages live as long
-- as their senders were granted. ARGV[4]: how long to remember (ms).
if redis.call('EXISTS', qb .. 'seen') == 1 then
  redis.call('PEXPIRE', qb .. 'seen', ARGV[4])
  return 0
end
redis.call('SET', qb .. 'seen', '1', 'PX', ARGV[4])
local entries = redis.call('HGETALL', qb .. 'm')
local longer = 0
for i = 1, #entries, 2 do
  local seq, exp, pexp, cost, len, s = parse(entries[i + 1])
  if exp < pexp then
    redis.call('HSET', qb .. 'm', entries[i], format_meta(seq, pexp, pexp, cost, len, s))
    redis.call('ZADD', qb .. 'x', pexp, entries[i])
    longer = longer + 1
  end
end
if longer > 0 then reschedule() end
return longer
