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
-- A group hash also holds its expiry field, named "" (no bucket field is
-- empty): the instant, in integer milliseconds since the Unix epoch, until
-- which the hash lives, which is its TTL's end on the server's clock. It
-- is read with the request's buckets, in the same HMGET, so that a
-- request knows whether the hash exists and how long it lives without a
-- command of its own. A write raises it, never lowers it, to the instant
-- when the last bucket it wrote is full, rounded up to the millisecond and
-- then some; once per batch, after its last operation, the TTL of every
-- hash whose field the batch raised follows (PEXPIREAT). A hash without
-- the field is one the batch creates, or one this script did not write
-- (by hand, or an earlier version of it): PEXPIREAT NX sets the TTL of
-- the first, which has none, and for the others, which may have a longer
-- one, PEXPIREAT GT raises it and PEXPIRETIME then tells the field what
-- it is (on servers older than 7.0, which refuse NX and GT, PTTL and TIME
-- do the same); a hash that had no TTL at all gets one. So an idle group
-- costs no memory and never expires before every bucket in it is full
-- anyway, under the limits it was written with. A later request with a
-- lower rate or a higher capacity finds a bucket that fills later than
-- the hash expires or its class says, until its next write: such a bucket
-- may be deleted before it is full, that is start full again. On a test
-- clock the field is written all the same, and the hash gets no TTL.
--
-- A bucket that ends a request full is deleted from the hash, and a hash
-- left with its expiry field alone is deleted, as Redis deletes a hash
-- left empty. Buckets of other subjects refill to full without a request,
-- and stay in the hash (stale) until the group expires or a write deletes
-- them: each request that adds buckets to a group that exists (it has an
-- expiry field, or one of the request's buckets) first samples 4 of its
-- fields per bucket added, at random (HRANDFIELD, on Redis 6.2 and later;
-- on older servers nothing is sampled), and deletes those that are full
-- by their class, before it writes. A bucket can only become stale once
-- per time it was added, and each addition removes 4 / fields stale
-- buckets on average, so stale buckets stop growing once they are about a
-- quarter of their group's fields, even if every request came from a new
-- subject that never came back; a request that only updates buckets the
-- group holds (the common case: a subject that keeps calling) samples
-- nothing, and neither does one that creates the hash.
--
-- Earlier versions kept a string "<tokens> <at>" per bucket, at the key
-- "<prefix>:{<subject>}:<bucket>", and then a hash per subject at
-- "<prefix>:{<subject>}"; this script never reads or writes those keys,
-- which expire on their own. Group hashes written before the expiry field
-- existed get it on their next write, as above.
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
-- Returns one string: a line per operation, in order, joined by "\n" (one
-- string rather than an array of replies, so that Redis builds, and the
-- client reads, one value per batch):
--   take, adjust  "<status> <state>": status is 1 if the charges were
--                 written, 0 if the request was denied (nothing written),
--                 and 2 if the request is a duplicate of one applied within
--                 its window (nothing written); state is the present,
--                 formatted with %.17g, and then the n buckets as they were
--                 before this request's charge, in order, each after a
--                 single space: "-" for a full bucket (no field), the
--                 field's value as stored when it has a class (E's digits
--                 and two of the class), and otherwise "=" and E formatted
--                 with %.17g (which may be "inf"). The client computes each
--                 level as this script does, min(capacity, (now - E) / 1e6
--                 * rate), on the same float64 numbers, so it gets exactly
--                 the levels the script decided on, while the script
--                 formats no level (Redis would truncate a Lua number in a
--                 reply to an integer).
--   acquire       "<acquired (1 or 0)> <in_use>": in_use is the number of
--                 live leases after the decision.
--   release       "0 0".
-- or, for an operation that found a key it cannot read (a malformed value,
-- another type), "!" and an error message, without line breaks, in its
-- place: that operation wrote nothing, and the others were applied as
-- usual.
--
-- The whole batch fails with an error reply, before anything is written,
-- when its arguments are malformed. Every operation reads its keys and
-- checks them before it writes any, and no write below can fail once the
-- first has succeeded (Redis refuses a script's writes for OOM only before
-- its first one), so a batch is never left half-written.

-- Every call of this script runs all of it, definitions included, so it
-- keeps to few tables, closures, strings and commands: operations are
-- parsed into flat arrays (a request of one bucket with one pattern match,
-- others with one per bucket), tables are reused from one request to the
-- next, a reply line is built in one concatenation, and a group's TTL is
-- raised once per batch, at the end. Library functions are locals, and a
-- request of one bucket passes its fields to HMGET and HSET without
-- unpack (together, 3% of the script's time).

local tonumber, match, format, huge = tonumber, string.match, string.format, math.huge
local floor, abs, min, max = math.floor, math.abs, math.min, math.max

local function fail(msg)
  return redis.error_reply('ERR connectlimit batch.lua: ' .. msg)
end

-- finite reports whether v (a number or nil) is a finite number: v - v is
-- 0 for those, and NaN for NaN and infinities.
local function finite(v)
  return v and v - v == 0
end

local nops = #ARGV - 1
if nops < 1 then
  return fail('want the present and at least one operation, got ' .. #ARGV .. ' arguments')
end

local server_clock = ARGV[1] == ''
local now
if not server_clock then
  now = tonumber(ARGV[1])
  if not finite(now) then
    return fail('now is not a number: ' .. ARGV[1])
  end
end

-- never is the fill class of a bucket that no sweep deletes: one whose
-- time to fill is beyond 2^98 microseconds (4e15 years).
local never = 99

-- Parse and check every operation before running any. Operation i is
-- okind[i], its first key KEYS[okey[i]], its window owin[i] (false without
-- one), its buckets ofirst[i] to olast[i] of name and lim, or its lease
-- arguments olease[i]. lim[b] is {capacity, rate, cost, fill class}, one
-- table per distinct "<capacity> <rate> <cost>" of the batch (limits[...]),
-- since most requests of a batch share a few: each is converted, checked
-- and classed once.
local okind, okey, owin, ofirst, olast = {}, {}, {}, {}, {}
local name, lim, limits = {}, {}, {}
local olease
local nkeys, nb = 0, 0
for i = 1, nops do
  local s = ARGV[i + 1]
  -- Most operations are bucket requests of one bucket, which one match
  -- parses whole (nm1 and crx1 are then its bucket's fields).
  local kind, w, nm1, crx1 = match(s, '^(%S+) (%S+) (%S+) (%S+ %S+ %S+)$')
  local p
  if not kind then
    kind, p = match(s, '^(%S+)()')
  end
  okind[i], okey[i] = kind, nkeys + 1
  if kind == 'take' or kind == 'adjust' then
    local first, len = nb + 1, #s
    if nm1 then
      p = len + 1
    else
      w, p = match(s, '^ (%S+)()', p)
    end
    while w and (nm1 or p <= len) do
      local nm, crx, q = nm1, crx1, p
      if nm then
        nm1 = nil
      else
        nm, crx, q = match(s, '^ (%S+) (%S+ %S+ %S+)()', p)
        if not nm then
          break
        end
      end
      local l = limits[crx]
      if not l then
        local c, r, x = match(crx, '^(%S+) (%S+) (%S+)$')
        c, r, x = tonumber(c), tonumber(r), tonumber(x)
        local j = nb - first + 2
        if not (finite(c) and finite(r) and finite(x)) then
          return fail('operation ' .. i .. ': bucket ' .. j .. ': capacity, rate or cost is not a number')
        end
        if not (c > 0 and r > 0) then
          return fail('operation ' .. i .. ': bucket ' .. j .. ': capacity and rate must be positive')
        end
        -- The fill class: the least k >= 0 such that 2^k >= t, the time
        -- to fill from empty in microseconds (t = m * 2^k with 0.5 <= m
        -- < 1, so 2^k >= t, and 2^(k-1) >= t only when m is 0.5).
        local t, k = c / r * 1e6, never
        if t <= 2 ^ 98 then
          local m
          m, k = math.frexp(t)
          if m == 0.5 then
            k = k - 1
          end
          if k < 0 then
            k = 0
          end
        end
        l = {c, r, x, k}
        limits[crx] = l
      end
      nb = nb + 1
      name[nb], lim[nb] = nm, l
      p = q
    end
    if not w or p <= len or nb < first then
      local _, words = string.gsub(s, '%S+', '')
      return fail('operation ' .. i .. ': ' .. kind .. ' wants a window and a name and 3 numbers per bucket, got '
        .. (words - 1) .. ' fields')
    end
    ofirst[i], olast[i] = first, nb
    owin[i] = false
    if w ~= '-' then
      local v = tonumber(w)
      if not finite(v) or v <= 0 then
        return fail('operation ' .. i .. ': window is not a positive number: ' .. w)
      end
      owin[i] = v
      nkeys = nkeys + 1
    end
    nkeys = nkeys + 1
  elseif kind == 'acquire' then
    local l, t, m = match(s, '^acquire (%S+) (%S+) (%S+)$')
    l, t = tonumber(l), tonumber(t)
    if not (finite(l) and l >= 1 and finite(t) and t >= 1) then
      return fail('operation ' .. i .. ': acquire wants a limit and a ttl >= 1 and a member, got: ' .. s)
    end
    olease = olease or {}
    olease[i] = {l, t, m}
    nkeys = nkeys + 1
  elseif kind == 'release' then
    local m = match(s, '^release (%S+)$')
    if not m then
      return fail('operation ' .. i .. ': release wants a member, got: ' .. s)
    end
    olease = olease or {}
    olease[i] = {0, 0, m}
    nkeys = nkeys + 1
  else
    return fail('operation ' .. i .. ': unknown operation ' .. tostring(kind))
  end
end
if nkeys ~= #KEYS then
  return fail('the operations name ' .. nkeys .. ' keys, got ' .. #KEYS)
end

if server_clock then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- now_shown is the present as bucket requests' replies give it.
local now_shown = format('%.17g', now)

-- The longest TTL set, in milliseconds (about 31,700 years): beyond it PX
-- could overflow, and a bucket that far from full may as well stay.
local max_ttl_ms = 1e15

-- largest is the largest finite float64.
local largest = 1.7976931348623157e308

-- samples is how many fields of a group a write samples for full buckets
-- to delete, per bucket it adds to the group.
local samples = 4

-- On the server's clock, keys lists the group hashes whose expiry field
-- the batch raised, in order, and raised[key] is key's place n in it.
-- expiry[n] is the instant, in integer milliseconds, until which the batch
-- raised hash n to live, and expiry_s[n] the same formatted, as written to
-- the field. unknown[n] is true if the batch wrote to the hash when it had
-- no expiry field: a hash the batch created (without a TTL yet) or one
-- this script did not write (by hand, or by an earlier version), whose TTL
-- the batch does not know. (Arrays, rather than tables by key, cost a
-- batch less.)
local keys, raised, nexp = {}, {}, 0
local expiry, expiry_s, unknown = {}, {}, {}

-- scratch holds the arguments of one HSET or HDEL, and level[j] the
-- level of bucket j of one request (both reused by every request).
local scratch, level = {}, {}

local function bucket_request(i)
  local key, first, last = KEYS[okey[i]], ofirst[i], olast[i]
  local take = okind[i] == 'take'
  -- One read for all of the request's buckets; a key of another type
  -- fails this operation alone.
  -- The expiry field first, then the buckets: stored[j + 1] is bucket j.
  local stored
  if first == last then
    stored = redis.pcall('HMGET', key, '', name[first])
  else
    stored = redis.pcall('HMGET', key, '', unpack(name, first, last))
  end
  if stored.err then
    return redis.error_reply(stored.err .. ' (connectlimit batch.lua, key ' .. key .. ')')
  end
  -- horizon is the instant in milliseconds until which the hash lives,
  -- by its expiry field, or nil if it has none (see above).
  local horizon = stored[1]
  if horizon then
    horizon = tonumber(horizon)
    if not finite(horizon) then
      return fail('malformed expiry field at key ' .. key)
    end
  end
  -- found is true if the hash holds one of the request's buckets, and so
  -- exists.
  local found = false
  local allowed = true
  local levels
  for b = first, last do
    local j = b - first + 1
    local l = lim[b]
    local c, r, x = l[1], l[2], l[3]
    local tokens = c
    local v = stored[j + 1]
    -- shown is what the reply says of the bucket: "-" when it is full,
    -- else its value as stored when that has a class, else "=" and E.
    local shown = '-'
    if v then
      found = true
      -- The value is E's digits and two of the class, or E alone (see
      -- above). E is finite, or +inf for a debt beyond the float64
      -- range; -inf would be a full bucket, which is never stored.
      local digits = match(v, '^(%-?%d+)%d%d$')
      local e = tonumber(digits or v)
      if not e or e ~= e or e == -huge then
        return fail('malformed bucket value at key ' .. key .. ', field ' .. name[b])
      end
      if digits then
        shown = v
      else
        shown = '=' .. format('%.17g', e)
      end
      -- A clock that stepped back (now < the last write) shows less than
      -- was stored: it never shows more.
      tokens = min((now - e) / 1e6 * r, c)
    end
    level[j] = tokens
    if levels then
      levels = levels .. ' ' .. shown
    else
      levels = shown
    end

    -- bucket.Decide: a cost over capacity is never affordable; otherwise
    -- allow when the level covers the cost, up to a relative tolerance of
    -- 1e-9 that absorbs floating-point noise.
    if take and (x > c or tokens - x < -1e-9 * max(1, x)) then
      allowed = false
    end
  end

  -- The ID is checked before the decision counts: a duplicate is reported as
  -- such even if its buckets could not pay now.
  local window = owin[i]
  local marker = window and KEYS[okey[i] + 1]
  if marker then
    local v = redis.pcall('GET', marker)
    if type(v) == 'table' and v.err then
      return redis.error_reply(v.err .. ' (connectlimit batch.lua, key ' .. marker .. ')')
    end
    if v then
      local expires = tonumber(v)
      if not expires or expires ~= expires then
        return fail('malformed id marker value at key ' .. marker)
      end
      if now < expires then
        return '2 ' .. now_shown .. ' ' .. levels
      end
    end
  end

  if not allowed then
    return '0 ' .. now_shown .. ' ' .. levels
  end

  -- nset counts the values to write (in scratch, field then value),
  -- nfull the stored buckets that end full (after them), added the
  -- written buckets the group did not hold; need is the latest instant,
  -- in integer milliseconds since the epoch, at which a written bucket is
  -- full (rounded up, and then some).
  local nset, nfull, added, need = 0, 0, 0, 0
  local full
  for b = first, last do
    local j = b - first + 1
    local l = lim[b]
    local c, r, x = l[1], l[2], l[3]
    local after = level[j] - x
    if not take then
      -- A refund never lifts a bucket above capacity.
      after = min(after, c)
    end
    if after >= c then
      -- A full bucket is not stored.
      if stored[j + 1] then
        full = full or {}
        nfull = nfull + 1
        full[nfull] = name[b]
      end
    elseif x ~= 0 then
      -- (A zero cost leaves the level, and so E, as it is.) q is the level
      -- in microseconds of refill, rounded down, so that the stored level
      -- is never above the exact one by more than float64 rounding and is
      -- below it by less than 1 µs of refill. The nudge of a few ulps keeps
      -- a level that is a whole number of microseconds, but came out of
      -- the division a hair below it, exact.
      local q = after / r * 1e6
      if q > -huge and q < huge then
        q = floor(q + abs(q) * 2 ^ -51)
      end
      -- +inf would make E -inf, a full bucket; -inf makes E +inf.
      q = min(q, largest)
      local e, k = now - q, l[4]
      nset = nset + 2
      scratch[nset - 1] = name[b]
      if e > -2 ^ 53 and e < 2 ^ 53 then
        -- E's digits and two of the class: Redis keeps such a value as a
        -- 64-bit integer while it fits one.
        scratch[nset] = format('%d%02d', e, k)
      else
        -- Beyond, E in exponent form (or "inf"), with no class: such a
        -- bucket, in debt for centuries, is never swept.
        scratch[nset] = format('%.16e', e)
      end
      if not stored[j + 1] then
        added = added + 1
      end
      -- The stored bucket is full (c / r * 1e6 - q) µs from now, less than
      -- 1 µs after the exact level would be: a millisecond more than that
      -- also covers the float64 rounding of this sum.
      local us = (c - after) / r * 1e6
      if us ~= us or us > max_ttl_ms * 1000 then
        us = max_ttl_ms * 1000
      end
      local at = floor((now + us + 1) / 1000) + 1
      if at > need then
        need = at
      end
    end
  end
  if added > 0 and (horizon or found) then
    -- A write that adds buckets to an existing group first sweeps a few
    -- others: it samples fields at random (HRANDFIELD, Redis 6.2 and
    -- later) and deletes those that are full by their class (a bucket
    -- whose E is 2^k µs or more in the past, k being its class). A value
    -- without a class, or that is not a number, is left alone, and so is
    -- the expiry field. A hash with neither an expiry field nor one of
    -- the request's buckets most likely does not exist: it is not sampled.
    local sample = redis.pcall('HRANDFIELD', key, samples * added, 'WITHVALUES')
    if type(sample) == 'table' and not sample.err then
      local gone
      local ngone = 0
      for s = 2, #sample, 2 do
        local e, k = match(sample[s], '^(%-?%d+)(%d%d)$')
        e, k = tonumber(e), tonumber(k)
        if e and k and k < never and now - e >= 2 ^ k and sample[s - 1] ~= '' then
          gone = gone or {}
          ngone = ngone + 1
          gone[ngone] = sample[s - 1]
        end
      end
      if ngone > 0 then
        redis.call('HDEL', key, unpack(gone, 1, ngone))
      end
    end
  end
  if nfull > 0 then
    redis.call('HDEL', key, unpack(full, 1, nfull))
    -- A hash left with its expiry field alone goes, as Redis deletes a
    -- hash left empty.
    if nset == 0 and horizon and redis.call('HLEN', key) == 1 then
      redis.call('DEL', key)
    end
  end
  if nset > 0 then
    -- The hash lives until its last bucket is full: its expiry field and
    -- TTL are raised, never lowered, to the instant the written buckets
    -- need; the TTL once for the whole batch (see below).
    local at = need
    if not horizon or at > horizon then
      nset = nset + 2
      scratch[nset - 1] = ''
      local at_s = format('%d', at)
      scratch[nset] = at_s
      if server_clock then
        local n = raised[key]
        if not n then
          nexp = nexp + 1
          n = nexp
          keys[n], raised[key] = key, n
          expiry[n], expiry_s[n], unknown[n] = at, at_s, not horizon
        else
          if at > expiry[n] then
            expiry[n], expiry_s[n] = at, at_s
          end
          if not horizon then
            unknown[n] = true
          end
        end
      end
    end
    if nset == 4 then
      redis.call('HSET', key, scratch[1], scratch[2], scratch[3], scratch[4])
    else
      redis.call('HSET', key, unpack(scratch, 1, nset))
    end
  end
  if marker then
    local expires = format('%.0f', now + window)
    if server_clock then
      redis.call('SET', marker, expires, 'PX', format('%.0f', math.ceil(window / 1000)))
    else
      redis.call('SET', marker, expires)
    end
  end
  return '1 ' .. now_shown .. ' ' .. levels
end

-- lease_set returns an operation's lease set key, or nil and an error reply
-- if the key holds something other than a sorted set.
local function lease_set(i)
  local key = KEYS[okey[i]]
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'zset' and kind ~= 'none' then
    return nil, redis.error_reply('WRONGTYPE connectlimit batch.lua: lease set at key ' .. key .. ' is a ' .. tostring(kind))
  end
  return key
end

local function acquire(i)
  local key, err = lease_set(i)
  if err then
    return err
  end
  local limit, lease_ttl, member = olease[i][1], olease[i][2], olease[i][3]
  -- A lease whose expiry is now or earlier has ended.
  redis.call('ZREMRANGEBYSCORE', key, '-inf', format('%.0f', now))

  local acquired = 0
  if redis.call('ZSCORE', key, member) or redis.call('ZCARD', key) < limit then
    redis.call('ZADD', key, format('%.0f', now + lease_ttl), member)
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
    redis.call('PEXPIRE', key, format('%.0f', ms))
  end
  return format('%d %d', acquired, in_use)
end

local function release(i)
  local key, err = lease_set(i)
  if err then
    return err
  end
  -- Redis deletes a sorted set once it is empty.
  redis.call('ZREM', key, olease[i][3])
  return '0 0'
end

local replies = {}
for i = 1, nops do
  local kind = okind[i]
  local r
  if kind == 'acquire' then
    r = acquire(i)
  elseif kind == 'release' then
    r = release(i)
  else
    r = bucket_request(i)
  end
  if type(r) == 'table' then
    -- An operation's error reply: "!" and its message, on one line.
    r = '!' .. string.gsub(r.err, '[\r\n]', ' ')
  end
  replies[i] = r
end

-- Raise the TTL of every group hash the batch wrote to, never lowering it,
-- to the instant its expiry field now holds: the longest time until full
-- of the buckets written to it. A hash whose expiry field the batch read
-- has that TTL: PEXPIREAT raises it in one command. One that had no field
-- is most likely one the batch created, without a TTL: PEXPIREAT NX (Redis
-- 7.0) sets it. If NX changed nothing, the hash had a TTL the batch does
-- not know: PEXPIREAT GT raises it, never lowering it, and the expiry
-- field gets the TTL the hash ends up with (PEXPIRETIME), so that the
-- field again tells its TTL. On an older server, which refuses NX, PTTL
-- does the same. A hash that had no TTL at all (made persistent by hand)
-- gets one.
local nx = true
for n = 1, nexp do
  local key, at = keys[n], expiry_s[n]
  if not unknown[n] then
    redis.call('PEXPIREAT', key, at)
  else
    local set = 0
    if nx then
      set = redis.pcall('PEXPIREAT', key, at, 'NX')
      if type(set) == 'table' then
        nx, set = false, 0
      end
    end
    if set == 0 then
      local ends
      if nx then
        redis.call('PEXPIREAT', key, at, 'GT')
        ends = redis.call('PEXPIRETIME', key)
      else
        local pttl = redis.call('PTTL', key)
        local t = redis.call('TIME')
        local ms = floor((tonumber(t[1]) * 1000000 + tonumber(t[2])) / 1000)
        if pttl < 0 or ms + pttl < expiry[n] then
          redis.call('PEXPIREAT', key, at)
          ends = expiry[n]
        else
          ends = ms + pttl
        end
      end
      if ends > expiry[n] then
        redis.call('HSET', key, '', format('%d', ends))
      end
    end
  end
end
return table.concat(replies, '\n')
