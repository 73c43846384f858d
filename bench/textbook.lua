-- The textbook Redis token bucket, as found in tutorials and API gateways:
-- one hash per bucket holding its tokens and the instant of its last update,
-- with the instant taken from the caller's clock (ARGV[3]).
--
-- KEYS[1]  the bucket's hash
-- ARGV[1]  capacity, in tokens
-- ARGV[2]  refill rate, in tokens per second
-- ARGV[3]  now, in seconds since the Unix epoch (the application's clock)
-- ARGV[4]  cost, in tokens
--
-- Returns 1 if the call is allowed, 0 if not. The hash expires twice the
-- time an empty bucket takes to refill after its last update.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])

local state = redis.call("HMGET", KEYS[1], "tokens", "ts")
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now

local elapsed = math.max(0, now - ts)
tokens = math.min(capacity, tokens + elapsed * rate)

local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end

redis.call("HMSET", KEYS[1], "tokens", tokens, "ts", now)
redis.call("EXPIRE", KEYS[1], math.max(1, math.ceil(capacity / rate * 2)))
return allowed
