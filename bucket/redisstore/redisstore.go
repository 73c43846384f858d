// Package redisstore is a Redis [bucket.Store]: the [Store] that lets every
// replica of a service share one set of token buckets.
//
// Each [Store.Take] is one atomic Lua script (take.lua, run with EVALSHA
// and falling back to EVAL when the server lacks it) that refills, decides
// and charges all of a request's buckets at once, on the Redis server's own
// clock (TIME), so that application servers with skewed clocks cannot
// over-admit. A bucket that refills to full is deleted, and every other
// bucket key expires when it would be full, so idle subjects cost no
// memory.
//
// [New] accepts any [redis.UniversalClient]: a single server
// ([redis.Client]), Sentinel ([redis.NewFailoverClient]) or Redis Cluster
// ([redis.ClusterClient]); the keys of one request share a {hash tag} so
// that they live in one Cluster slot. Redis 5 or later is required (the
// script reads TIME before writing, which needs effects replication).
package redisstore

import (
	"context"
	_ "embed" // for take.lua
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
)

// DefaultKeyPrefix starts every key a [Store] writes, unless set with
// [WithKeyPrefix].
const DefaultKeyPrefix = "cl"

//go:embed take.lua
var takeSource string

// takeScript is the one script every Store runs. [redis.Script.Run] tries
// EVALSHA with its digest and falls back to EVAL (which also caches it) if
// the server answers NOSCRIPT, e.g. after a restart or SCRIPT FLUSH.
var takeScript = redis.NewScript(takeSource)

var _ bucket.Store = (*Store)(nil)

// Store is a [bucket.Store] whose buckets live in Redis. Create one with
// [New]. It is safe for concurrent use, and any number of Stores, in any
// number of processes, may share one Redis: each Take is atomic on the
// server.
//
// A bucket of subject S named B lives at the key "<prefix>:{S}:B" (see
// [WithKeyPrefix] for how S and B are escaped) and holds the string
// "<tokens> <instant in microseconds>".
type Store struct {
	client redis.Scripter
	prefix string
	// now is nil in production: the script then reads the server's clock.
	now func() time.Time
}

type config struct {
	prefix string
	now    func() time.Time
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
// Keys are "<prefix>:{<subject>}:<bucket>". Each of prefix, subject and
// bucket name is used as is when it is at most 64 bytes drawn from
// A-Z a-z 0-9 and . _ @ = - : (so "user:alice" stays readable); any other
// string, including one with braces, control bytes, invalid UTF-8 or more
// than 64 bytes, is replaced by "#" and the first 144 bits of its SHA-256 in
// unpadded base64url (25 bytes in all). A verbatim name never contains "#",
// so it never equals a hashed one, and the subject, being brace-free, is
// exactly the key's Cluster hash tag.
func WithKeyPrefix(prefix string) Option {
	return optionFunc(func(c *config) { c.prefix = prefix })
}

// withClock makes the script decide at now() instead of at the server's
// TIME, and write keys without a TTL (which would run on the server's real
// clock, not on now). Only tests use it, through export_test.go:
// application clocks skew, and a store that trusted them would over-admit.
func withClock(now func() time.Time) Option {
	return optionFunc(func(c *config) { c.now = now })
}

// New returns a Store that keeps its buckets in client's Redis. The Store
// does not close client.
//
// Take honours its context's deadline only as far as client does: set
// [redis.Options.ContextTimeoutEnabled] so that a hung server fails a call
// at its deadline rather than after ReadTimeout (3 s by default).
func New(client redis.UniversalClient, opts ...Option) *Store {
	cfg := config{prefix: DefaultKeyPrefix}
	for _, o := range opts {
		o.apply(&cfg)
	}
	return &Store{client: client, prefix: escape(cfg.prefix), now: cfg.now}
}

// Take implements [bucket.Store]: it refills, decides and, if allowed,
// charges every bucket of req in one script run on the server's clock.
//
// Take returns an error wrapping [bucket.ErrInvalidRequest] for a malformed
// request, and otherwise an error only when Redis failed. When the server
// answered with an error (a [redis.Error], such as a script error, a
// Cluster CROSSSLOT or OOM), nothing was charged. When the reply was lost
// instead (a timeout, the context's deadline, a dropped connection after
// the script was sent), whether it was charged is unknown. Note that
// go-redis resends a command whose reply it lost up to
// [redis.Options.MaxRetries] times (3 by default), which can charge a
// request twice; set MaxRetries to -1 to charge at most once.
func (s *Store) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if err := req.Validate(); err != nil {
		return bucket.Decision{}, err
	}
	if s == nil || s.client == nil {
		return bucket.Decision{}, errors.New("redisstore: take: Store has no Redis client (use New)")
	}
	if err := ctx.Err(); err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	n := len(req.Charges)
	keys := make([]string, n)
	args := make([]any, 2+3*n)
	args[0] = req.Mode.String()
	args[1] = ""
	if s.now != nil {
		args[1] = strconv.FormatInt(s.now().UnixMicro(), 10)
	}
	subject := escape(req.Subject)
	for i, c := range req.Charges {
		keys[i] = key(s.prefix, subject, escape(c.Bucket))
		args[2+3*i] = formatFloat(c.Limit.Capacity)
		args[3+3*i] = formatFloat(c.Limit.RefillPerSecond)
		args[4+3*i] = formatFloat(c.Cost)
	}
	reply, err := takeScript.Run(ctx, s.client, keys, args...).Slice()
	if err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	applied, levels, err := parseReply(reply, n)
	if err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	// The script decided with the same arithmetic on the same levels; Decide
	// rebuilds the Decision (RetryAfter, ResetAfter) from them so that the
	// arithmetic lives in one place. A disagreement is a bug, never ignored.
	d := bucket.Decide(req, levels)
	if d.Allowed != applied {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: take.lua and bucket.Decide disagree on levels %v: script applied=%v, Decide allowed=%v (the charge may have been applied)", levels, applied, d.Allowed)
	}
	return d, nil
}

// parseReply checks the script's reply: {applied (0 or 1), level_1, ...,
// level_n} with levels as decimal strings.
func parseReply(reply []any, n int) (applied bool, levels []float64, err error) {
	if len(reply) != n+1 {
		return false, nil, fmt.Errorf("malformed script reply: %d elements, want %d", len(reply), n+1)
	}
	flag, ok := reply[0].(int64)
	if !ok || (flag != 0 && flag != 1) {
		return false, nil, fmt.Errorf("malformed script reply: applied flag is %T %v, want integer 0 or 1", reply[0], reply[0])
	}
	levels = make([]float64, n)
	for i := range n {
		str, ok := reply[i+1].(string)
		if !ok {
			return false, nil, fmt.Errorf("malformed script reply: level %d is %T, want a string", i, reply[i+1])
		}
		v, err := strconv.ParseFloat(str, 64)
		if err != nil || math.IsNaN(v) {
			return false, nil, fmt.Errorf("malformed script reply: level %d is %q, want a number", i, str)
		}
		levels[i] = v
	}
	return flag == 1, levels, nil
}

// formatFloat formats f so that Lua's tonumber reads back exactly f.
func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }
