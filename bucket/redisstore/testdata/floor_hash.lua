-- floor_hash.lua is BenchmarkScript's second lower reference, not part of
-- the store: floor_string.lua's GCRA kept as batch.lua keeps buckets, one
-- field per bucket (ARGV[i + 1]) in a group hash (KEYS[i]) whose expiry
-- field "" and TTL follow its buckets: an HMGET, and for an allowed
-- request an HSET and a PEXPIREAT. It checks nothing, formats no state and
-- reports only "1" or "0" per request.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local interval, tolerance = 100000, 10000000
for i = 1, #KEYS do
  local key, field = KEYS[i], ARGV[i + 1]
  local v = redis.call('HMGET', key, '', field)
  local tat = tonumber(v[2]) or now
  if tat < now then
    tat = now
  end
  tat = tat + interval
  if tat - tolerance <= now then
    local at = string.format('%d', math.floor(now / 1000) + math.ceil((tat - now) / 1000))
    redis.call('HSET', key, field, string.format('%d', tat), '', at)
    redis.call('PEXPIREAT', key, at)
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out, '\n')
