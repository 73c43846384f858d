-- take.lua charges one subject's token buckets, all or nothing, at most
-- once per request ID. It is the Redis half of bucket.Decide: same refill,
-- same tolerance, same results.
--
-- KEYS[i]        bucket i's key, for i = 1..n.
-- KEYS[n+1]      the request ID's marker key, present only when the request
--                has an ID. All keys share one {hash tag} (the subject), so
--                that the script runs on Redis Cluster.
-- ARGV[1]        "take" or "adjust" (bucket.Mode's names).
-- ARGV[2]        the present in integer microseconds since the Unix epoch, or
--                "" to read the server's clock with TIME. Production always
--                sends ""; only tests send an instant, and then keys get no
--                TTL: it would run on the server's real clock, not the test's,
--                and could end a bucket the test still reads.
-- ARGV[3]        the idempotency window in integer microseconds when KEYS
--                holds a marker key, else "".
-- ARGV[3i+1..3i+3] bucket i's capacity, refill per second and cost, as
--                numbers formatted by Go's strconv.FormatFloat(f, 'g', -1, 64).
--
-- A bucket key holds the string "<tokens> <at>": its level in tokens (%.17g,
-- so it round-trips exactly) at instant <at> in integer microseconds. A
-- missing key is a full bucket. A bucket that ends full is deleted; any
-- other gets a TTL of the time until it is full, rounded up to the
-- millisecond, so that idle subjects cost no memory and a key never expires
-- before it would have been full anyway.
--
-- A marker key holds "<expires>", the instant in integer microseconds until
-- which its ID counts as applied. The script compares it with the present
-- (so that a test clock sees it expire), and on the server's clock also
-- sets the window as the key's TTL, so that the marker disappears when it
-- no longer counts. It is written only when the request is applied.
--
-- Returns {status, level_1, ..., level_n}: status is 1 if the charges were
-- written, 0 if the request was denied (nothing written), and 2 if the
-- request is a duplicate of one applied within the window (nothing
-- written); level_i is bucket i's level refilled to the present, before
-- this request's charge, as a %.17g string, because Redis would truncate a
-- Lua number to an integer. Errors are returned before anything is written.

local has_id = ARGV[3] ~= nil and ARGV[3] ~= ''
local n = #KEYS
if has_id then
  n = n - 1
end
if n < 1 or #ARGV ~= 3 + 3 * n then
  return redis.error_reply('ERR connectlimit take.lua: want at least one bucket key and 3+3*buckets arguments, got '
    .. #KEYS .. ' keys and ' .. #ARGV .. ' arguments')
end
local window
if has_id then
  window = tonumber(ARGV[3])
  if not window or window <= 0 then
    return redis.error_reply('ERR connectlimit take.lua: window is not a positive number: ' .. ARGV[3])
  end
end

local mode = ARGV[1]
if mode ~= 'take' and mode ~= 'adjust' then
  return redis.error_reply('ERR connectlimit take.lua: unknown mode ' .. mode)
end

local server_clock = ARGV[2] == ''
local now
if server_clock then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[2])
  if not now then
    return redis.error_reply('ERR connectlimit take.lua: now is not a number: ' .. ARGV[2])
  end
end

-- The longest TTL set, in milliseconds (about 31,700 years): beyond it PX
-- could overflow, and a bucket that far from full may as well stay.
local max_ttl_ms = 1e15

local capacity, rate, cost, level = {}, {}, {}, {}
local applied = true
for i = 1, n do
  local c, r, x = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  if not (c and r and x) then
    return redis.error_reply('ERR connectlimit take.lua: bucket ' .. i .. ': capacity, rate or cost is not a number')
  end
  capacity[i], rate[i], cost[i] = c, r, x

  local tokens = c
  local stored = redis.call('GET', KEYS[i])
  if stored then
    local t, at = string.match(stored, '^(%S+) (%S+)$')
    t, at = tonumber(t), tonumber(at)
    -- t ~= t is true only for NaN.
    if not (t and at) or t ~= t or at ~= at then
      return redis.error_reply('ERR connectlimit take.lua: malformed bucket value at key ' .. KEYS[i])
    end
    -- A clock that stepped back (elapsed < 0) refills nothing.
    local elapsed = now - at
    if elapsed > 0 then
      t = t + elapsed / 1e6 * r
    end
    tokens = math.min(t, c)
  end
  level[i] = tokens

  -- bucket.Decide: a cost over capacity is never affordable; otherwise
  -- allow when the level covers the cost, up to a relative tolerance of
  -- 1e-9 that absorbs floating-point noise.
  if mode == 'take' and (x > c or tokens - x < -1e-9 * math.max(1, x)) then
    applied = false
  end
end

local reply = {0}
for i = 1, n do
  reply[i + 1] = string.format('%.17g', level[i])
end

-- The ID is checked before the decision counts: a duplicate is reported as
-- such even if its buckets could not pay now.
local marker = KEYS[n + 1]
if has_id then
  local stored = redis.call('GET', marker)
  if stored then
    local expires = tonumber(stored)
    if not expires or expires ~= expires then
      return redis.error_reply('ERR connectlimit take.lua: malformed id marker value at key ' .. marker)
    end
    if now < expires then
      reply[1] = 2
      return reply
    end
  end
end

if not applied then
  return reply
end

for i = 1, n do
  local after = level[i] - cost[i]
  if mode == 'adjust' then
    -- A refund never lifts a bucket above capacity.
    after = math.min(after, capacity[i])
  end
  if after >= capacity[i] then
    redis.call('DEL', KEYS[i])
  elseif not server_clock then
    redis.call('SET', KEYS[i], string.format('%.17g %.0f', after, now))
  else
    local ms = math.ceil((capacity[i] - after) / rate[i] * 1000)
    if ms ~= ms or ms > max_ttl_ms then
      ms = max_ttl_ms
    elseif ms < 1 then
      ms = 1
    end
    redis.call('SET', KEYS[i], string.format('%.17g %.0f', after, now), 'PX', string.format('%.0f', ms))
  end
end
if has_id then
  local expires = string.format('%.0f', now + window)
  if server_clock then
    redis.call('SET', marker, expires, 'PX', string.format('%.0f', math.ceil(window / 1000)))
  else
    redis.call('SET', marker, expires)
  end
end
reply[1] = 1
return reply
