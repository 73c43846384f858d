package redisstore

import "time"

// DefaultKeyPrefix starts every key a [Store] writes, unless set with
// [WithKeyPrefix].
const DefaultKeyPrefix = "cl"

// DefaultTimeout is how long a [Store] waits for the reply to one batch,
// unless set with [WithTimeout]: 100 milliseconds, a hundred times a healthy
// round trip within a data centre, yet short enough that a hung server costs
// a rate-limited call little.
const DefaultTimeout = 100 * time.Millisecond

// DefaultMaxBatch is the largest number of operations a [Store] sends in one
// batch, unless set with [WithMaxBatch].
const DefaultMaxBatch = 256

// maxBatchLimit bounds [WithMaxBatch]: a script blocks the Redis server
// while it runs, so one batch must stay a few milliseconds of work.
const maxBatchLimit = 4096

// maxInFlight is how many batches a Store has sent and not yet seen
// answered at once. Two keep the connection busy (one batch fills while the
// other travels) without spreading a burst over many small batches.
const maxInFlight = 2

// linger is how long a Store's goroutine waits for the next batch once the
// queue is empty before it exits: long enough that a caller making call
// after call reuses it, short enough that an idle Store soon has none.
const linger = 10 * time.Millisecond

// DefaultGroups is how many group hashes a [Store] spreads subjects over,
// unless set with [WithGroups]: 65,536, enough for about four million
// buckets that are not full (64 per group) before groups outgrow Redis's
// compact encoding.
const DefaultGroups = 1 << 16

// maxGroups bounds [WithGroups]: 2^32 groups are far more than any Redis
// holds buckets for.
const maxGroups = 1 << 32

type config struct {
	prefix   string
	timeout  time.Duration
	maxBatch int
	groups   uint64
	now      func() time.Time
}

// Option configures a [Store].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

// WithKeyPrefix sets the prefix of every key the Store writes, so that
// several applications (or tests) can share one Redis. The default is
// [DefaultKeyPrefix], "cl".
//
// Keys are "<prefix>:{g/<n>}" for the hash of group n's buckets (see
// [WithGroups]), whose fields are "<subject>/<bucket name>",
// "<prefix>:{g/<n>}~id:<subject>/<request ID>" for the markers of
// idempotent requests and "<prefix>:{<subject>}~lease:<lease name>" for
// lease sets, whose members are lease IDs. Each of prefix, subject, bucket
// name, request ID, lease name and lease ID is used as is when it is at
// most 64 bytes drawn from A-Z a-z 0-9 and . _ @ = - : (so "user:alice"
// stays readable); any other string, including one with braces, spaces,
// slashes, control bytes, invalid UTF-8 or more than 64 bytes, is replaced
// by "#" and the first 144 bits of its SHA-256 in unpadded base64url (25
// bytes in all). A field longer than 64 bytes is replaced likewise, by the
// hash of "<subject>/<bucket name>". A verbatim name never contains "#" or
// "/", so it never equals a hashed one, a join is unambiguous, and a
// subject never equals a group's tag "g/<n>"; the tag between the braces
// is exactly the key's Cluster hash tag; and what follows its "}"
// (nothing, or "~id:" or "~lease:") keeps group hashes apart from markers
// and lease sets.
func WithKeyPrefix(prefix string) Option {
	return optionFunc(func(c *config) { c.prefix = prefix })
}

// WithGroups sets how many group hashes the Store spreads subjects over;
// the default is [DefaultGroups], 65,536. A zero or negative n selects the
// default, and n above 2^32 is lowered to 2^32.
//
// Buckets that are not full live in group hashes, "<prefix>:{g/<n>}", one
// field per bucket, where n is a hash of the subject modulo the number of
// groups (see [WithKeyPrefix]). Redis keeps a hash of at most 128 fields
// of at most 64 bytes each (its hash-max-listpack-entries and
// hash-max-listpack-value) as one compact listpack, where a bucket costs
// about 35 bytes; a key costs about 120 bytes more, shared by the group's
// buckets. So size n to the number of buckets that are not full at once
// (active buckets): with about 64 per group (n = active buckets / 64),
// almost no group reaches 128 fields, and a bucket costs about 35 bytes.
// More groups than that cost more per bucket (with one bucket per group, a
// key's worth: about 160 bytes), fewer make the fullest groups convert to
// a hash table, which costs several times as much per bucket and never
// converts back while the group lives; both are correct, only memory
// differs. Full buckets of subjects that stopped calling (stale buckets,
// see the package doc) count too: a group that is written to keeps up to
// about a quarter of its fields stale in the worst case (every write from
// a new subject), which the 64 per group leave room for.
//
// The number of groups, like the prefix, is part of the storage format:
// every Store that shares a Redis and a prefix must use the same one.
// Changing it moves every subject to another group, as a new prefix does:
// every bucket starts full, and the old groups expire on their own TTLs.
func WithGroups(n int) Option {
	return optionFunc(func(c *config) {
		switch {
		case n <= 0:
			c.groups = DefaultGroups
		case uint64(n) > maxGroups:
			c.groups = maxGroups
		default:
			c.groups = uint64(n)
		}
	})
}

// WithTimeout sets how long the Store waits for the reply to one batch,
// counted from the moment the batch is handed to the Redis client; the
// default is [DefaultTimeout]. A zero or negative d selects the default.
//
// Each batch gets its own deadline, independent of its callers' contexts,
// so that a hung server fails a batch (with an error wrapping
// [bucket.ErrOutcomeUnknown]) after d, and a slow batch never shortens the
// wait of the calls queued behind it: they get a whole d of their own once
// they are sent. Set [redis.Options.ContextTimeoutEnabled] on the client so
// that the deadline also ends the client's socket read: otherwise the Store
// still answers the batch's callers, half a timeout after the deadline
// (which leaves a client that honours it the time to report its own error
// first), but the batch keeps one of the Store's two in-flight slots until
// the client's ReadTimeout (3 s by default).
func WithTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) {
		if d > 0 {
			c.timeout = d
		}
	})
}

// WithMaxBatch sets the largest number of operations (Take, Acquire and
// Release calls) the Store sends to Redis in one script call; the default
// is [DefaultMaxBatch], 256. A zero or negative n selects the default, and
// n above 4096 is lowered to 4096, since a script blocks the Redis server
// while it runs. WithMaxBatch(1) turns coalescing off.
func WithMaxBatch(n int) Option {
	return optionFunc(func(c *config) {
		switch {
		case n <= 0:
			c.maxBatch = DefaultMaxBatch
		case n > maxBatchLimit:
			c.maxBatch = maxBatchLimit
		default:
			c.maxBatch = n
		}
	})
}

// withClock makes the script decide at now() instead of at the server's
// TIME, and write keys without a TTL (which would run on the server's real
// clock, not on now); ID markers and leases still expire at now(), since
// the script compares their expiry instants with it. The clock is read once
// per batch, when the batch is sent. Only tests use it, through
// export_test.go: application clocks skew, and a store that trusted them
// would over-admit.
func withClock(now func() time.Time) Option {
	return optionFunc(func(c *config) { c.now = now })
}
