-- batch.lua applies a batch of operations, in order, on one clock reading:
-- bucket requests (the Redis half of bucket.Decide: same refill, same
-- tolerance, same results, all or nothing per request and at most once per
-- request ID) and concurrency leases (the Redis half of memstore's leases:
-- a lease is live while now < its expiry). Operations later in the batch
-- see what earlier ones wrote, exactly as if they had been sent one by one.
--
-- KEYS           every operation's keys, operation after operation, in the
--                order of ARGV. All keys of one operation share one {hash
--                tag} (its subject's group for a bucket request, its subject
--                for a lease); on Redis Cluster every key of a batch is in
--                one hash slot, since the store splits batches by slot.
-- ARGV[1]        the present in integer microseconds since the Unix epoch, or
--                "" to read the server's clock with TIME (once, for the whole
--                batch). Production always sends ""; only tests send an
--                instant, and then keys get no TTL: it would run on the
--                server's real clock, not the test's, and could end a key the
--                test still reads.
-- ARGV[1+i]      operation i, for i = 1..#ARGV-1: fields separated by single
--                spaces, numbers formatted by Go's strconv.FormatFloat(f, 'g',
--                -1, 64) or as integers. One string per operation, rather than
--                one argument per field, keeps the client's allocations and
--                the command's size small.
--
--   "take <window> <name_1> <capacity_1> <rate_1> <cost_1> ... <name_n> <capacity_n> <rate_n> <cost_n>"
--   "adjust <window> ..." (the same fields)
--                a bucket request of n >= 1 buckets in bucket.ModeTake or
--                bucket.ModeAdjust. Its keys are the subject's group hash
--                and, when <window> is not "-", the request ID's marker key;
--                <window> is then the ID window in integer microseconds, > 0.
--                <name_j> is bucket j's field in the group hash (its subject
--                and name, escaped and joined, without spaces); the names of
--                one request differ. Rates are in tokens per second.
--   "acquire <limit> <ttl> <member>"
--                acquire or renew lease <member> (an escaped lease ID, which
--                has no spaces) if fewer than <limit> (>= 1) leases are live,
--                for <ttl> (>= 1) microseconds. Its key is the lease set.
--   "release <member>"
--                release lease <member>. Its key is the lease set.
--
-- Buckets live in group hashes, each shared by the subjects whose names
-- hash to it (the store picks the group), with one field per bucket that is
-- not full, named after its subject and bucket. A hash of at most 128
-- fields of at most 64 bytes is a listpack, so that a bucket costs Redis its
-- field and one integer, not a key of its own. The field holds the
-- bucket's empty instant E and its fill class k. E is the instant, in
-- integer microseconds since the Unix epoch, at which the bucket held (or,
-- in debt, will hold) zero tokens, refilling at its rate. Its level at the
-- present is then
--
--     level = min(capacity, (now - E) / 1e6 * rate)
--
-- which is the stored level plus the refill since it was stored, up to
-- float64 rounding (a few 1e-16 of the level, as for any float64 refill). A
-- missing field (or hash) is a full bucket, and so is a field whose level
-- has reached the capacity. Writing a level L stores
--
--     E = now - floor(q + |q| * 2^-51), where q = L / rate * 1e6
--
-- (the nudge, a few ulps, keeps a quotient that should be a whole number
-- but came out a hair below it whole), so that the stored level is below L
-- by less than 1 µs of refill (rate * 1e-6 tokens) and above it by no more
-- than float64 rounding (under 1e-15 of L); levels that are whole
-- microseconds of refill, as those of integer costs at integer rates are,
-- are exact. A quotient beyond the float64 range is clamped to the largest
-- float64 (which only lowers the level) or, in debt, makes E +inf (the
-- level is then -inf). A zero cost leaves the value as it is. Since E
-- depends on the rate, changing a bucket's rate scales the level of a
-- bucket that is not full by new rate / old rate; changing its capacity
-- keeps the level (capped at the new capacity).
--
-- The fill class k is the least k >= 0 such that the bucket fills from
-- empty (capacity / rate * 1e6 µs) in at most 2^k µs under the limits it
-- was written with, or 99 (never) beyond 2^98 µs. A bucket whose E is 2^k
-- µs or more in the past is full, so a write can tell the full buckets of
-- other subjects from their values alone, without their limits; at most
-- twice the time to fill passes before it can. While |E| < 2^53 (a level,
-- or debt, of less than about 230 years of refill) the value is E's digits
-- followed by two digits of k ("-200000023" is E = -2000000, k = 23): a
-- 64-bit integer in the listpack while it fits one, which costs no more
-- than E alone. Beyond that it is E written with %.16e (or "inf"), so that
-- it reads back exactly, with no class: such a bucket is never swept.
--
-- A clock that steps back (a failover to a server whose clock is behind)
-- shows levels lower than they were, never higher, until it catches up.
--
-- A bucket that ends a request full is deleted from the hash, and Redis
-- deletes a hash once it is empty. Buckets of other subjects refill to full
-- without a request, and stay in the hash (stale) until the group expires
-- or a write deletes them: each request that adds buckets to a group also
-- samples 4 of its fields per bucket added, at random (HRANDFIELD, on Redis
-- 6.2 and later; on older servers nothing is sampled), and deletes those
-- that are full by their class. A bucket can only become stale once per
-- time it was added, and each addition removes 4 / fields stale buckets on
-- average, so stale buckets stop growing once they are about a quarter of
-- their group's fields, even if every request came from a new subject that
-- never came back; a request that only updates buckets the group holds
-- (the common case: a subject that keeps calling) samples nothing. On the server's clock the hash's
-- TTL is at least the time until its last bucket is full (each write
-- raises it, never lowers it, to the time until the written buckets are
-- full, rounded up to the millisecond and then some), so that an idle
-- group costs no memory and never expires before every bucket in it is
-- full anyway, under the limits it was written with. A later request with
-- a lower rate or a higher capacity finds a bucket that fills later than
-- the hash expires or its class says, until its next write: such a bucket
-- may be deleted before it is full, that is start full again. On a test
-- clock the hash gets no TTL.
--
-- Earlier versions kept a string "<tokens> <at>" per bucket, at the key
-- "<prefix>:{<subject>}:<bucket>", and then a hash per subject at
-- "<prefix>:{<subject>}"; this script never reads or writes those keys,
-- which expire on their own.
--
-- A marker key holds "<expires>", the instant in integer microseconds until
-- which its ID counts as applied. The script compares it with the present
-- (so that a test clock sees it expire), and on the server's clock also sets
-- the window as the key's TTL, so that the marker disappears when it no
-- longer counts. It is written only when the request is applied.
--
-- A lease set is a sorted set whose members are the escaped IDs of the leases
-- and whose scores are their expiry instants in integer microseconds. On the
-- server's clock its TTL is the latest expiry, so that the set of a subject
-- whose holders all died disappears on its own.
--
-- Returns one reply per operation, in order:
--   take, adjust  {status, levels}: status is 1 if the charges were
--                 written, 0 if the request was denied (nothing written),
--                 and 2 if the request is a duplicate of one applied within
--                 its window (nothing written); levels is the n buckets'
--                 levels refilled to the present, before this request's
--                 charge, in order, each formatted with %.17g and separated
--                 by single spaces: one string, because Redis would truncate
--                 a Lua number to an integer and each string of a reply is
--                 an allocation for the client.
--   acquire       {acquired (1 or 0), in_use}: in_use is the number of live
--                 leases after the decision.
--   release       {0, 0}.
-- or, for an operation that found a key it cannot read (a malformed value,
-- another type), an error reply in its place: that operation wrote nothing,
-- and the others were applied as usual.
--
-- The whole batch fails with an error reply, before anything is written,
-- when its arguments are malformed. Every operation reads its keys and
-- checks them before it writes any, and no write below can fail once the
-- first has succeeded (Redis refuses a script's writes for OOM only before
-- its first one), so a batch is never left half-written.

local function fail(msg)
  return redis.error_reply('ERR connectlimit batch.lua: ' .. msg)
end

-- number reads a finite number, or returns nil.
local function number(s)
  local v = tonumber(s)
  -- v ~= v is true only for NaN.
  if not v or v ~= v or v == math.huge or v == -math.huge then
    return nil
  end
  return v
end

local nops = #ARGV - 1
if nops < 1 then
  return fail('want the present and at least one operation, got ' .. #ARGV .. ' arguments')
end

local server_clock = ARGV[1] == ''
local now
if not server_clock then
  now = number(ARGV[1])
  if not now then
    return fail('now is not a number: ' .. ARGV[1])
  end
end

-- Parse and check every operation before running any.
local ops = {}
local nkeys = 0
for i = 1, nops do
  local f = {}
  for w in string.gmatch(ARGV[i + 1], '%S+') do
    f[#f + 1] = w
  end
  local kind = f[1]
  local op = {kind = kind, key = nkeys + 1}
  if kind == 'take' or kind == 'adjust' then
    local n = (#f - 2) / 4
    if n < 1 or n ~= math.floor(n) then
      return fail('operation ' .. i .. ': ' .. kind .. ' wants a window and a name and 3 numbers per bucket, got '
        .. (#f - 1) .. ' fields')
    end
    if f[2] ~= '-' then
      op.window = number(f[2])
      if not op.window or op.window <= 0 then
        return fail('operation ' .. i .. ': window is not a positive number: ' .. f[2])
      end
    end
    op.n, op.name, op.capacity, op.rate, op.cost = n, {}, {}, {}, {}
    for j = 1, n do
      local c, r, x = number(f[4 * j]), number(f[4 * j + 1]), number(f[4 * j + 2])
      if not (c and r and x) then
        return fail('operation ' .. i .. ': bucket ' .. j .. ': capacity, rate or cost is not a number')
      end
      if not (c > 0 and r > 0) then
        return fail('operation ' .. i .. ': bucket ' .. j .. ': capacity and rate must be positive')
      end
      op.name[j], op.capacity[j], op.rate[j], op.cost[j] = f[4 * j - 1], c, r, x
    end
    nkeys = nkeys + 1
    if op.window then
      nkeys = nkeys + 1
    end
  elseif kind == 'acquire' then
    op.limit, op.ttl, op.member = number(f[2]), number(f[3]), f[4]
    if #f ~= 4 or not op.limit or op.limit < 1 or not op.ttl or op.ttl < 1 then
      return fail('operation ' .. i .. ': acquire wants a limit and a ttl >= 1 and a member, got: ' .. ARGV[i + 1])
    end
    nkeys = nkeys + 1
  elseif kind == 'release' then
    op.member = f[2]
    if #f ~= 2 then
      return fail('operation ' .. i .. ': release wants a member, got: ' .. ARGV[i + 1])
    end
    nkeys = nkeys + 1
  else
    return fail('operation ' .. i .. ': unknown operation ' .. tostring(kind))
  end
  ops[i] = op
end
if nkeys ~= #KEYS then
  return fail('the operations name ' .. nkeys .. ' keys, got ' .. #KEYS)
end

if server_clock then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The longest TTL set, in milliseconds (about 31,700 years): beyond it PX
-- could overflow, and a bucket that far from full may as well stay.
local max_ttl_ms = 1e15

-- read returns a string key's value, false if it is missing, or nil and an
-- error reply if it holds another type.
local function read(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' and v.err then
    return nil, redis.error_reply(v.err .. ' (connectlimit batch.lua, key ' .. key .. ')')
  end
  return v
end

-- largest is the largest finite float64.
local largest = 1.7976931348623157e308

-- never is the fill class of a bucket that no sweep deletes: one whose
-- time to fill is beyond 2^98 microseconds (4e15 years).
local never = 99

-- fill_class returns the fill class of a bucket of capacity c refilling at
-- r tokens per second: the least k >= 0 such that it fills from empty in
-- at most 2^k microseconds, or never.
local function fill_class(c, r)
  local t = c / r * 1e6
  if not (t <= 2 ^ 98) then
    return never
  end
  local k = math.max(0, math.ceil(math.log(t) / math.log(2)))
  if 2 ^ k < t then
    k = k + 1
  elseif k > 0 and 2 ^ (k - 1) >= t then
    k = k - 1
  end
  return k
end

-- encode returns the value stored for a bucket whose empty instant is e
-- and whose fill class is k: the digits of e followed by two digits of k
-- while e is an integer of less than 2^53 in magnitude (Redis stores such
-- a value as a 64-bit integer while it fits one, which takes no more room
-- than e alone), and otherwise e in exponent form (or "inf"), which holds
-- no class: such a bucket, in debt for centuries, is never swept.
local function encode(e, k)
  if e > -2 ^ 53 and e < 2 ^ 53 then
    return string.format('%.17g%02d', e, k)
  end
  return string.format('%.16e', e)
end

-- decode returns the empty instant (nil if it is not a number) and the
-- fill class (nil if there is none) of a stored value.
local function decode(v)
  if string.find(v, '^%-?%d%d%d+$') then
    return tonumber(string.sub(v, 1, -3)), tonumber(string.sub(v, -2))
  end
  return tonumber(v), nil
end

-- samples is how many fields of a group a write samples for full buckets
-- to delete, per bucket it adds to the group.
local samples = 4

-- sweep deletes the full buckets among count fields of the group hash at
-- key, sampled at random: a bucket whose empty instant E is at least
-- 2^k microseconds in the past, k being its fill class, is full under the
-- limits it was written with. A value without a class, or that is not a
-- number, is left alone. HRANDFIELD needs Redis 6.2: on an older server
-- nothing is sampled, and full buckets other than the request's own stay
-- until the group expires.
local function sweep(key, count)
  local sample = redis.pcall('HRANDFIELD', key, count, 'WITHVALUES')
  if type(sample) ~= 'table' or sample.err then
    return
  end
  local gone = {}
  for i = 1, #sample - 1, 2 do
    local e, k = decode(sample[i + 1])
    if e and k and k < never and now - e >= 2 ^ k then
      gone[#gone + 1] = sample[i]
    end
  end
  if #gone > 0 then
    redis.call('HDEL', key, unpack(gone))
  end
end

local function bucket_request(op)
  local n, key = op.n, KEYS[op.key]
  -- One read for all of the request's buckets; a key of another type
  -- fails this operation alone.
  local stored = redis.pcall('HMGET', key, unpack(op.name))
  if stored.err then
    return redis.error_reply(stored.err .. ' (connectlimit batch.lua, key ' .. key .. ')')
  end
  local level = {}
  local allowed = true
  for j = 1, n do
    local c, r, x = op.capacity[j], op.rate[j], op.cost[j]
    local tokens = c
    if stored[j] then
      -- E is finite, or +inf for a debt beyond the float64 range; -inf
      -- would be a full bucket, which is never stored.
      local e = decode(stored[j])
      if not e or e ~= e or e == -math.huge then
        return fail('malformed bucket value at key ' .. key .. ', field ' .. op.name[j])
      end
      -- A clock that stepped back (now < the last write) shows less than
      -- was stored: it never shows more.
      tokens = math.min((now - e) / 1e6 * r, c)
    end
    level[j] = tokens

    -- bucket.Decide: a cost over capacity is never affordable; otherwise
    -- allow when the level covers the cost, up to a relative tolerance of
    -- 1e-9 that absorbs floating-point noise.
    if op.kind == 'take' and (x > c or tokens - x < -1e-9 * math.max(1, x)) then
      allowed = false
    end
  end

  local formatted = {}
  for j = 1, n do
    formatted[j] = string.format('%.17g', level[j])
  end
  local reply = {0, table.concat(formatted, ' ')}

  -- The ID is checked before the decision counts: a duplicate is reported as
  -- such even if its buckets could not pay now.
  local marker = op.window and KEYS[op.key + 1]
  if marker then
    local v, err = read(marker)
    if err then
      return err
    end
    if v then
      local expires = tonumber(v)
      if not expires or expires ~= expires then
        return fail('malformed id marker value at key ' .. marker)
      end
      if now < expires then
        reply[1] = 2
        return reply
      end
    end
  end

  if not allowed then
    return reply
  end

  local set, full = {}, {}
  -- ttl is the longest time until full of the written buckets, in
  -- milliseconds; added counts the buckets the group did not hold.
  local ttl = 0
  local added = 0
  for j = 1, n do
    local c, r = op.capacity[j], op.rate[j]
    local after = level[j] - op.cost[j]
    if op.kind == 'adjust' then
      -- A refund never lifts a bucket above capacity.
      after = math.min(after, c)
    end
    if after >= c then
      -- A full bucket is not stored.
      if stored[j] then
        full[#full + 1] = op.name[j]
      end
    elseif op.cost[j] ~= 0 then
      -- (A zero cost leaves the level, and so E, as it is.) q is the level
      -- in microseconds of refill, rounded down, so that the stored level
      -- is never above the exact one by more than float64 rounding and is
      -- below it by less than 1 µs of refill. The nudge of a few ulps keeps
      -- a level that is a whole number of microseconds, but came out of
      -- the division a hair below it, exact.
      local q = after / r * 1e6
      if q > -math.huge and q < math.huge then
        q = math.floor(q + math.abs(q) * 2 ^ -51)
      end
      -- +inf would make E -inf, a full bucket; -inf makes E +inf.
      q = math.min(q, largest)
      set[#set + 1] = op.name[j]
      set[#set + 1] = encode(now - q, fill_class(c, r))
      if not stored[j] then
        added = added + 1
      end
      -- The stored bucket is full (c / r * 1e6 - q) µs from now, less than
      -- 1 µs after the exact level would be: a millisecond more than that
      -- also covers the float64 rounding of this sum.
      local ms = math.floor(((c - after) / r * 1e6 + 1) / 1000) + 1
      if ms ~= ms or ms > max_ttl_ms then
        ms = max_ttl_ms
      end
      ttl = math.max(ttl, ms)
    end
  end
  if #full > 0 then
    redis.call('HDEL', key, unpack(full))
  end
  if #set > 0 then
    redis.call('HSET', key, unpack(set))
    -- The hash lives until its last bucket is full: raise its TTL, never
    -- lower it, since other buckets of the subject may need it longer.
    if server_clock then
      local pttl = redis.call('PTTL', key)
      if pttl < ttl then
        redis.call('PEXPIRE', key, string.format('%.0f', ttl))
      end
    end
  end
  if added > 0 then
    -- A write that adds buckets to the group also sweeps a few others.
    sweep(key, samples * added)
  end
  if marker then
    local expires = string.format('%.0f', now + op.window)
    if server_clock then
      redis.call('SET', marker, expires, 'PX', string.format('%.0f', math.ceil(op.window / 1000)))
    else
      redis.call('SET', marker, expires)
    end
  end
  reply[1] = 1
  return reply
end

-- lease_set returns an operation's lease set key, or nil and an error reply
-- if the key holds something other than a sorted set.
local function lease_set(op)
  local key = KEYS[op.key]
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'zset' and kind ~= 'none' then
    return nil, redis.error_reply('WRONGTYPE connectlimit batch.lua: lease set at key ' .. key .. ' is a ' .. tostring(kind))
  end
  return key
end

local function acquire(op)
  local key, err = lease_set(op)
  if err then
    return err
  end
  -- A lease whose expiry is now or earlier has ended.
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now))

  local acquired = 0
  if redis.call('ZSCORE', key, op.member) or redis.call('ZCARD', key) < op.limit then
    redis.call('ZADD', key, string.format('%.0f', now + op.ttl), op.member)
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
end

local function release(op)
  local key, err = lease_set(op)
  if err then
    return err
  end
  -- Redis deletes a sorted set once it is empty.
  redis.call('ZREM', key, op.member)
  return {0, 0}
end

local replies = {}
for i = 1, nops do
  local op = ops[i]
  if op.kind == 'acquire' then
    replies[i] = acquire(op)
  elseif op.kind == 'release' then
    replies[i] = release(op)
  else
    replies[i] = bucket_request(op)
  end
end
return replies
