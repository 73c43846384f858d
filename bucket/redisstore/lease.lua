-- lease.lua acquires, renews or releases one concurrency lease of a
-- subject's named limit. It is the Redis half of memstore's leases: same
-- expiry rule (a lease is live while now < its expiry), same results.
--
-- KEYS[1]  the lease set's key: a sorted set whose members are the escaped
--          IDs of the leases and whose scores are their expiry instants in
--          integer microseconds since the Unix epoch.
-- ARGV[1]  "acquire" or "release".
-- ARGV[2]  the present in integer microseconds, or "" to read the server's
--          clock with TIME. Production always sends ""; only tests send an
--          instant, and then the key gets no TTL: it would run on the
--          server's real clock, not the test's.
-- ARGV[3]  the lease's member (its escaped ID).
-- ARGV[4]  acquire only: the limit, an integer >= 1.
-- ARGV[5]  acquire only: the TTL in integer microseconds, >= 1.
--
-- acquire deletes the expired leases, then renews the lease if it is live
-- or adds it if fewer than limit leases are, and, on the server's clock,
-- sets the key's TTL to the latest expiry, so that the set of a subject
-- whose holders all died disappears on its own. It returns {acquired,
-- in_use}: acquired is 1 or 0, in_use the number of live leases after the
-- decision.
--
-- release removes the lease, live, expired or unknown; Redis deletes a
-- sorted set once it is empty. It returns {0, 0}.
--
-- Errors are returned before anything is written.

if #KEYS ~= 1 then
  return redis.error_reply('ERR connectlimit lease.lua: want 1 key, got ' .. #KEYS)
end
local key, op, member = KEYS[1], ARGV[1], ARGV[3]

if op == 'release' then
  if #ARGV ~= 3 then
    return redis.error_reply('ERR connectlimit lease.lua: release wants 3 arguments, got ' .. #ARGV)
  end
  redis.call('ZREM', key, member)
  return {0, 0}
end

if op ~= 'acquire' or #ARGV ~= 5 then
  return redis.error_reply('ERR connectlimit lease.lua: want "acquire" with 5 arguments or "release" with 3, got '
    .. tostring(op) .. ' with ' .. #ARGV)
end
local limit, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
if not limit or limit < 1 or not ttl or ttl < 1 then
  return redis.error_reply('ERR connectlimit lease.lua: limit and ttl must be positive numbers, got '
    .. ARGV[4] .. ' and ' .. ARGV[5])
end

local server_clock = ARGV[2] == ''
local now
if server_clock then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[2])
  if not now then
    return redis.error_reply('ERR connectlimit lease.lua: now is not a number: ' .. ARGV[2])
  end
end

-- A lease whose expiry is now or earlier has ended.
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now))

local expires = string.format('%.0f', now + ttl)
local acquired = 0
if redis.call('ZSCORE', key, member) or redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, expires, member)
  acquired = 1
end
local in_use = redis.call('ZCARD', key)

if server_clock and in_use > 0 then
  -- The last lease to expire decides when the whole set can go.
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  local ms = math.ceil((tonumber(last[2]) - now) / 1000)
  if ms < 1 then
    ms = 1
  end
  redis.call('PEXPIRE', key, string.format('%.0f', ms))
end
return {acquired, in_use}
