-- Unexpired messages after a cursor, oldest first, nothing removed.
-- ARGV[4..]: after (seq), limit, byte budget (-1: none). Returns id, meta, data triples:
-- at most `limit` messages whose costs add up to at most the budget, but always one.
local after, limit, budget = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', qb .. 'o', '(' .. after, '+inf')
local out = {}
local count, size = 0, 0
for _, id in ipairs(ids) do
  if count >= limit then break end
  local meta = redis.call('HGET', qb .. 'm', id)
  if meta then
    local _, exp, _, cost = parse(meta)
    if exp > now then
      size = size + cost
      if budget >= 0 and count > 0 and size > budget then break end
      count = count + 1
      out[#out + 1] = id
      out[#out + 1] = meta
      out[#out + 1] = redis.call('HGET', qb .. 'd', id)
    end
  end
end
return out
