-- floor_string.lua is BenchmarkScript's lower reference, not part of the
-- store: the least a batched token bucket script can do on Redis. It keeps
-- one string per bucket, a GCRA "theoretical arrival time" in integer
-- microseconds with a TTL (the layout of go-redis/redis_rate, batched),
-- for buckets of capacity 100 refilling 10 per second, cost 1: a GET and
-- a SET ... PX per request, on one TIME reading. It checks nothing and
-- reports only "1" (allowed) or "0" per key, and its layout costs Redis
-- about 113 bytes per bucket.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local interval, tolerance = 100000, 10000000
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then
    tat = now
  end
  tat = tat + interval
  if tat - tolerance <= now then
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', string.format('%d', math.ceil((tat - now) / 1000)))
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out, '\n')
