// Package redisstore is a Redis [bucket.Store] and [bucket.LeaseStore]: the
// [Store] that lets every replica of a service share one set of token
// buckets and concurrency limits.
//
// Each [Store.Take] is one atomic Lua script (take.lua, run with EVALSHA
// and falling back to EVAL when the server lacks it) that refills, decides
// and charges all of a request's buckets at once, on the Redis server's own
// clock (TIME), so that application servers with skewed clocks cannot
// over-admit. A bucket that refills to full is deleted, and every other
// bucket key expires when it would be full, so idle subjects cost no
// memory. The same script checks and records the ID of an idempotent
// request in a marker key that expires after [bucket.IdempotencyWindow].
//
// [Store.Acquire] and [Store.Release] run a second script (lease.lua) on
// one sorted set per subject and lease name, whose members are the leases
// and whose scores are their expiry instants on the server's clock. The
// set expires with its last lease, so the slots of an instance that died
// come back after the lease TTL, and an idle subject costs no memory.
//
// [New] accepts any [redis.UniversalClient]: a single server
// ([redis.Client]), Sentinel ([redis.NewFailoverClient]) or Redis Cluster
// ([redis.ClusterClient]); the keys of one request share a {hash tag} so
// that they live in one Cluster slot. Redis 5 or later is required (the
// script reads TIME before writing, which needs effects replication).
package redisstore

import (
	"context"
	_ "embed" // for take.lua and lease.lua
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

//go:embed lease.lua
var leaseSource string

// leaseScript runs every Acquire and Release, like takeScript.
var leaseScript = redis.NewScript(leaseSource)

var (
	_ bucket.Store      = (*Store)(nil)
	_ bucket.LeaseStore = (*Store)(nil)
)

// Store is a [bucket.Store] and [bucket.LeaseStore] whose buckets and
// leases live in Redis. Create one with [New]. It is safe for concurrent
// use, and any number of Stores, in any number of processes, may share one
// Redis: each Take, Acquire and Release is atomic on the server.
//
// For a subject S, with S and the other names escaped as [WithKeyPrefix]
// describes, a Store writes three kinds of keys:
//
//   - "<prefix>:{S}:B", the bucket named B: the string "<tokens> <instant
//     in microseconds>", expiring when the bucket would be full;
//   - "<prefix>:{S}~id:I", the marker of an applied request with ID I:
//     the string "<instant in microseconds>" until which I counts as
//     applied, expiring then ([bucket.IdempotencyWindow] after it was set);
//   - "<prefix>:{S}~lease:N", the leases of the concurrency limit named
//     N: a sorted set of lease IDs scored by their expiry instants in
//     microseconds, expiring with the last of them.
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
// Keys are "<prefix>:{<subject>}:<bucket>" for buckets,
// "<prefix>:{<subject>}~id:<request ID>" for the markers of idempotent
// requests and "<prefix>:{<subject>}~lease:<lease name>" for lease sets;
// lease set members are lease IDs. Each of prefix, subject, bucket name,
// request ID, lease name and lease ID is used as is when it is at most 64
// bytes drawn from A-Z a-z 0-9 and . _ @ = - : (so "user:alice" stays
// readable); any other string, including one with braces, control bytes,
// invalid UTF-8 or more than 64 bytes, is replaced by "#" and the first 144
// bits of its SHA-256 in unpadded base64url (25 bytes in all). A verbatim
// name never contains "#", so it never equals a hashed one; the subject,
// being brace-free, is exactly the key's Cluster hash tag; and the
// character after its "}" (":" or "~") keeps buckets apart from markers
// and lease sets.
func WithKeyPrefix(prefix string) Option {
	return optionFunc(func(c *config) { c.prefix = prefix })
}

// withClock makes the scripts decide at now() instead of at the server's
// TIME, and write keys without a TTL (which would run on the server's real
// clock, not on now); ID markers and leases still expire at now(), since
// the scripts compare their expiry instants with it. Only tests use it, through export_test.go:
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
// A request with an [bucket.Request.ID] is checked against, and once
// applied recorded in, its marker key in the same script run, so a resent
// request is never applied twice within [bucket.IdempotencyWindow] of the
// server's clock.
//
// Take returns an error wrapping [bucket.ErrInvalidRequest] for a malformed
// request, and otherwise an error only when Redis failed. When the server
// answered with an error (a [redis.Error], such as a script error, a
// Cluster CROSSSLOT or OOM), nothing was charged. When the reply was lost
// instead (a timeout, the context's deadline, a dropped connection after
// the script was sent), whether it was charged is unknown. Note that
// go-redis resends a command whose reply it lost up to
// [redis.Options.MaxRetries] times (3 by default), which can charge a
// request without an ID twice; give requests IDs, or set MaxRetries to -1
// to charge at most once.
func (s *Store) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if err := req.Validate(); err != nil {
		return bucket.Decision{}, err
	}
	if err := s.ready(ctx); err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	n := len(req.Charges)
	keys := make([]string, n, n+1)
	args := make([]any, 3+3*n)
	args[0] = req.Mode.String()
	args[1] = s.nowArg()
	args[2] = ""
	subject := escape(req.Subject)
	for i, c := range req.Charges {
		keys[i] = key(s.prefix, subject, escape(c.Bucket))
		args[3+3*i] = formatFloat(c.Limit.Capacity)
		args[4+3*i] = formatFloat(c.Limit.RefillPerSecond)
		args[5+3*i] = formatFloat(c.Cost)
	}
	if req.ID != "" {
		keys = append(keys, idKey(s.prefix, subject, escape(req.ID)))
		args[2] = strconv.FormatInt(req.Window().Microseconds(), 10)
	}
	reply, err := takeScript.Run(ctx, s.client, keys, args...).Slice()
	if err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	got, levels, err := parseReply(reply, n)
	if err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	if got == duplicate {
		if req.ID == "" {
			return bucket.Decision{}, errors.New("redisstore: take: take.lua reported a duplicate of a request without an ID")
		}
		return bucket.DecideDuplicate(req, levels), nil
	}
	// The script decided with the same arithmetic on the same levels; Decide
	// rebuilds the Decision (RetryAfter, ResetAfter) from them so that the
	// arithmetic lives in one place. A disagreement is a bug, never ignored.
	d := bucket.Decide(req, levels)
	if d.Allowed != (got == applied) {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: take.lua and bucket.Decide disagree on levels %v: script applied=%v, Decide allowed=%v (the charge may have been applied)", levels, got == applied, d.Allowed)
	}
	return d, nil
}

// nowArg is the scripts' "now" argument: "" to read the server's clock, or
// the test clock's instant in microseconds.
func (s *Store) nowArg() string {
	if s.now == nil {
		return ""
	}
	return strconv.FormatInt(s.now().UnixMicro(), 10)
}

// verdict is take.lua's answer to a request.
type verdict int64

const (
	// denied means the request was not applied and nothing was written.
	denied verdict = 0
	// applied means the charges (and the ID, if any) were written.
	applied verdict = 1
	// duplicate means the request's ID was applied within the window, so
	// nothing was written.
	duplicate verdict = 2
)

// parseReply checks take.lua's reply: {verdict (0, 1 or 2), level_1, ...,
// level_n} with levels as decimal strings.
func parseReply(reply []any, n int) (verdict, []float64, error) {
	if len(reply) != n+1 {
		return denied, nil, fmt.Errorf("malformed script reply: %d elements, want %d", len(reply), n+1)
	}
	flag, ok := reply[0].(int64)
	if v := verdict(flag); !ok || (v != denied && v != applied && v != duplicate) {
		return denied, nil, fmt.Errorf("malformed script reply: verdict is %T %v, want integer 0, 1 or 2", reply[0], reply[0])
	}
	levels := make([]float64, n)
	for i := range n {
		str, ok := reply[i+1].(string)
		if !ok {
			return denied, nil, fmt.Errorf("malformed script reply: level %d is %T, want a string", i, reply[i+1])
		}
		v, err := strconv.ParseFloat(str, 64)
		if err != nil || math.IsNaN(v) {
			return denied, nil, fmt.Errorf("malformed script reply: level %d is %q, want a number", i, str)
		}
		levels[i] = v
	}
	return verdict(flag), levels, nil
}

// Acquire implements [bucket.LeaseStore]: in one script run on the server's
// clock it deletes the expired leases of req's subject and name, renews
// req.ID's lease if it is live or acquires it if fewer than req.Limit
// leases are, and sets the lease set's TTL to its last expiry. The TTL is
// rounded up to a microsecond.
//
// Acquire returns an error wrapping [bucket.ErrInvalidRequest] for a
// malformed request, and otherwise an error only when Redis failed. After a
// lost reply, the lease may or may not be held; resending the same request
// is safe (it renews the lease), and so is releasing it.
func (s *Store) Acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	if err := req.Validate(); err != nil {
		return bucket.LeaseDecision{}, err
	}
	if err := s.ready(ctx); err != nil {
		return bucket.LeaseDecision{}, fmt.Errorf("redisstore: acquire: %w", err)
	}
	// The TTL in whole microseconds, rounded up (without overflowing).
	ttl := req.TTL / time.Microsecond
	if req.TTL%time.Microsecond != 0 {
		ttl++
	}
	keys := []string{leaseKey(s.prefix, escape(req.Subject), escape(req.Name))}
	reply, err := leaseScript.Run(ctx, s.client, keys, "acquire", s.nowArg(), escape(req.ID), strconv.Itoa(req.Limit), strconv.FormatInt(int64(ttl), 10)).Slice()
	if err != nil {
		return bucket.LeaseDecision{}, fmt.Errorf("redisstore: acquire: %w", err)
	}
	acquired, inUse, err := parseLeaseReply(reply)
	if err != nil {
		return bucket.LeaseDecision{}, fmt.Errorf("redisstore: acquire: %w", err)
	}
	return bucket.LeaseDecision{Acquired: acquired, InUse: inUse, Limit: req.Limit}, nil
}

// parseLeaseReply checks lease.lua's reply to "acquire": {acquired (0 or
// 1), in_use (>= acquired)}.
func parseLeaseReply(reply []any) (acquired bool, inUse int, err error) {
	if len(reply) != 2 {
		return false, 0, fmt.Errorf("malformed script reply: %d elements, want 2", len(reply))
	}
	flag, ok := reply[0].(int64)
	if !ok || (flag != 0 && flag != 1) {
		return false, 0, fmt.Errorf("malformed script reply: acquired flag is %T %v, want integer 0 or 1", reply[0], reply[0])
	}
	n, ok := reply[1].(int64)
	if !ok || n < flag || int64(int(n)) != n {
		return false, 0, fmt.Errorf("malformed script reply: in-use count is %T %v, want an integer from %d", reply[1], reply[1], flag)
	}
	return flag == 1, int(n), nil
}

// Release implements [bucket.LeaseStore]: it removes the lease id of
// (subject, name), if there is one, and Redis deletes the lease set once it
// is empty.
//
// Release returns an error wrapping [bucket.ErrInvalidRequest] for
// malformed arguments, and otherwise an error only when Redis failed, in
// which case the lease may still be held until its TTL passes.
func (s *Store) Release(ctx context.Context, subject, name, id string) error {
	if err := bucket.ValidateLease(subject, name, id); err != nil {
		return err
	}
	if err := s.ready(ctx); err != nil {
		return fmt.Errorf("redisstore: release: %w", err)
	}
	keys := []string{leaseKey(s.prefix, escape(subject), escape(name))}
	if err := leaseScript.Run(ctx, s.client, keys, "release", s.nowArg(), escape(id)).Err(); err != nil {
		return fmt.Errorf("redisstore: release: %w", err)
	}
	return nil
}

// ready reports why s cannot run a script now, if it cannot.
func (s *Store) ready(ctx context.Context) error {
	if s == nil || s.client == nil {
		return errors.New("Store has no Redis client (use New)")
	}
	return ctx.Err()
}

// formatFloat formats f so that Lua's tonumber reads back exactly f.
func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }
