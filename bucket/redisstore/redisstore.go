// Package redisstore is a Redis [bucket.Store] and [bucket.LeaseStore]: the
// [Store] that lets every replica of a service share one set of token
// buckets and concurrency limits.
//
// Every operation (a [Store.Take], [Store.Acquire] or [Store.Release]) runs
// in one atomic Lua script (batch.lua, run with EVALSHA and falling back to
// EVAL when the server lacks it) that refills, decides and charges all of a
// request's buckets at once, on the Redis server's own clock (TIME), so
// that application servers with skewed clocks cannot over-admit. The same
// script checks and records the ID of an idempotent request in a marker key
// that expires after the request's [bucket.Request.IDWindow], and keeps the
// leases of a concurrency limit in one sorted set per subject and lease
// name, scored by their expiry instants, which expires with its last lease.
//
// # Storage
//
// Buckets live in group hashes: a hash of the subject's name picks one of
// [WithGroups] groups (65,536 by default), and the group's hash holds one
// field per bucket that is not full, for every subject of the group. Small
// hashes are stored compactly (a listpack), so a bucket costs its field
// and one integer, and a key (about 120 bytes with its TTL) is shared by
// the group's buckets instead of costing each subject one. Measured on
// Redis 7.0 (used_memory, over 20,000 to 1,000,000 subjects such as
// "user:123456" with buckets such as "requests", with a group per 64
// buckets as [WithGroups] advises), a bucket costs about 35 bytes, whether
// its subject has one bucket or three; a hash per subject cost 160 and 65,
// and the string key per bucket of earlier versions 160 to 180. A full
// bucket is not stored: a bucket that ends a request full is removed from
// its group, requests that add buckets to a group delete a few of its
// other full buckets (see below), a group left without buckets is
// deleted, and a group expires once its last bucket would be full, so idle
// subjects cost no memory. Besides its buckets, a group holds its expiry
// field (the field ""): the instant, in milliseconds, when its TTL ends,
// which a request reads with its buckets, so that it knows whether the
// group exists and whether its TTL must be raised without commands of its
// own. A group without the field (written by an earlier version, or by
// hand) gets it on its next write, and a TTL that is raised, never
// lowered.
//
// A field holds the bucket's empty instant: the instant, in integer
// microseconds on the server's clock, at which the bucket held (or, in
// debt, will hold) no tokens, so that its level now is (now − instant) ×
// RefillPerSecond, capped at Capacity. Storing a level rounds the instant
// up, that is the level down, to the microsecond: a stored level is below
// the exact one by less than one microsecond of refill (RefillPerSecond ×
// 1e-6 tokens), and above it by float64 rounding at most (under 1e-15 of
// it, as with any float64 refill); levels that are whole microseconds of
// refill, as those of integer costs at integer rates are, are exact. So
// the store admits no more than [bucket.Decide] on exact levels would, up
// to that rounding, and may admit less, by less than a microsecond of
// refill per charge of a bucket. Since the instant depends on the rate,
// changing a bucket's RefillPerSecond scales the level of a bucket that is
// not full by the ratio of the new rate to the old (a lower rate lowers
// it), while changing its Capacity keeps the level, capped at the new
// capacity. A server clock that steps back shows lower levels, never
// higher ones, until it catches up.
//
// The field also holds the bucket's fill class, two more digits: the least
// k such that the bucket fills from empty in at most 2^k microseconds, so
// that a full bucket can be told from its value alone, without its limits,
// at most twice its time to fill after it was empty. Buckets of subjects
// that stop calling refill to full in their groups (stale buckets); each
// request that adds buckets to a group samples 4 of its buckets per bucket
// added, at random, and deletes those full by their class, so that stale
// buckets stay under about a quarter of a group that is written to
// (measured: of 64 stale buckets per group, 16 additions per group leave
// about 16), and a group that is not expires. A request that only updates
// buckets its group holds samples nothing. Stale buckets count towards
// the 128 fields of a compact group, as [WithGroups] allows for. The
// sampling needs Redis 6.2 (HRANDFIELD): on older servers stale buckets
// stay until their group expires.
//
// Earlier versions stored each bucket as a string "<tokens> <instant>" at
// the key "<prefix>:{<subject>}:<bucket>", and then a subject's buckets in
// a hash at "<prefix>:{<subject>}". This version neither reads nor writes
// those keys, which expire on their own TTLs, so after an upgrade every
// bucket starts full. While old and new versions run side by side they
// keep separate buckets, and a subject may be admitted by both.
//
// A Store coalesces concurrent operations: while two batches are in flight,
// new operations queue, and the next batch carries every queued operation
// (up to [WithMaxBatch]) in one script call, applied in queue order. Under
// light traffic an operation is sent at once, alone, so batching adds no
// latency; under heavy traffic it saves a round trip and a script call per
// operation. Each batch has its own deadline ([WithTimeout]); each caller's
// context bounds only its own wait.
//
// Every call has one of three outcomes: a decision (applied, or denied
// without change), an error wrapping [bucket.ErrNotApplied] (certainly
// changed nothing), or an error wrapping [bucket.ErrOutcomeUnknown] (the
// request may have been applied: resend it with the same
// [bucket.Request.ID] to find out). [Store.Take] says which failures are
// which.
//
// [New] accepts any [redis.UniversalClient]: a single server
// ([redis.Client]), Sentinel ([redis.NewFailoverClient]), Redis Cluster
// ([redis.ClusterClient]) or a [redis.Ring]. The keys of one operation share
// one {hash tag} (the subject's group for a Take, the subject for a lease),
// so that they live in one Cluster slot (or Ring shard), and a batch is
// split by slot (or by tag, for a Ring) into script calls sent together in
// one pipeline. Redis 5 or later is required (the script reads TIME before
// writing, which needs effects replication), and 6.2 or later advised: on
// older servers writes do not delete other subjects' full buckets, which
// then stay until their group expires.
//
// Configure the client with ContextTimeoutEnabled, so that a batch's
// deadline also ends its socket read; with MaxRetries -1 (for a
// ClusterClient, MaxRedirects -1), since go-redis resends a command whose
// reply it lost, which can charge a request without an ID twice and makes
// every failure's outcome unknown (the last attempt's error says nothing of
// the earlier ones); and with DialerRetries 1, so that a refused connection
// fails a batch at once, as not applied, instead of after the batch's
// deadline, as unknown. Requests with IDs are never charged twice within
// their window, resends or not.
//
// Subjects that call once and refill soon after (a crowd of anonymous
// callers, say) make Redis expire group hashes about as fast as the Store
// creates them. Redis expires keys in cycles paced by its hz setting (10
// per second by default), and under such churn a cycle can hold its event
// loop for milliseconds, which every client of that server sees in its
// tail latency. Measured with 512 concurrent callers over 100,000
// subjects (bench/README.md): p99 7.8 to 8.8 ms at hz 10, 4.7 to 5.4 ms at
// hz 100, with the same throughput and median. Raise hz if that tail
// matters.
package redisstore

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
)

var (
	_ bucket.Store      = (*Store)(nil)
	_ bucket.LeaseStore = (*Store)(nil)
)

// Store is a [bucket.Store] and [bucket.LeaseStore] whose buckets and
// leases live in Redis. Create one with [New]; the zero Store is not
// usable. It is safe for concurrent use, and any number of Stores, in any
// number of processes, may share one Redis: each operation is atomic on the
// server. A Store runs a goroutine only while it has batches in flight,
// and for 10 milliseconds after its last one (so that a caller making call
// after call reuses it instead of starting one per call), so it needs no
// Close, and one idle for longer costs nothing. It is not
// [bucket.InProcess]: a reply can be lost on the network, so it remembers
// request IDs (see [Store.Take]).
//
// Concurrent calls on one Store are coalesced into batches: at most two
// batches are in flight at once; the calls made meanwhile wait in a queue,
// and the next batch takes all of them, up to the maximum batch size
// ([WithMaxBatch], 256 by default), into one script call. Operations in a
// batch are applied one after the other, in the order they were queued,
// each with its own all-or-nothing semantics, so two operations on one
// bucket see each other exactly as two sequential calls would. The server's
// clock is read once per script call. On Redis Cluster a batch is split by
// hash slot, and on a Ring by hash tag, into script calls sent in one
// pipeline, so that each node gets one round trip.
//
// For a subject S in group n (see [WithGroups]), with S and the other names
// escaped as [WithKeyPrefix] describes, a Store writes three kinds of keys:
//
//   - "<prefix>:{g/n}", the buckets of group n's subjects: a hash whose
//     field "S/B" holds the empty instant in microseconds of S's bucket
//     named B and its fill class (see the package doc), and whose field ""
//     holds the instant in milliseconds when it expires: when the last of
//     them would be full;
//   - "<prefix>:{g/n}~id:S/I", the marker of S's applied request with ID
//     I: the string "<instant in microseconds>" until which I counts as
//     applied, expiring then ([bucket.Request.IDWindow] after it was set);
//   - "<prefix>:{S}~lease:N", the leases of the concurrency limit named
//     N: a sorted set of lease IDs scored by their expiry instants in
//     microseconds, expiring with the last of them.
type Store struct {
	client   redis.UniversalClient
	routing  routing
	prefix   string
	timeout  time.Duration
	maxBatch int
	// groupCount is how many group hashes subjects are spread over (see
	// [WithGroups]).
	groupCount uint64
	// oneAttempt reports that the client never resends a command, so that
	// an error it returns is about the only attempt (see failure).
	oneAttempt bool
	// now is nil in production: the script then reads the server's clock.
	now func() time.Time

	mu sync.Mutex
	// queue holds the operations waiting for a batch, oldest first.
	queue []*op
	// inFlight counts the batches sent and not yet answered, each with a
	// goroutine (run) that sends batches until the queue is empty.
	inFlight int
	// idle counts the goroutines (run) waiting for a batch on wake, at
	// most linger, less those a batch is already on its way to.
	idle int
	// wake hands a batch to a waiting goroutine. It has room for
	// maxInFlight batches, so that a send on it never blocks.
	wake chan []*op
}

// New returns a Store that keeps its buckets and leases in client's Redis.
// The Store does not close client. How it sends batches depends on the
// client's type: one script call per batch for a [*redis.Client] (a single
// server, or a Sentinel failover client), and one pipeline of script calls,
// one per hash slot, for a [*redis.ClusterClient] (or one per hash tag, for
// a [*redis.Ring] or any other client).
//
// The client should set [redis.Options.ContextTimeoutEnabled], so that a
// hung server fails a batch at its deadline rather than after ReadTimeout
// (3 s by default), and MaxRetries -1 and DialerRetries 1, so that failures
// can be told apart (see [Store.Take]). A ClusterClient resends pipelines
// up to MaxRedirects times, after a lost reply as after a MOVED redirection:
// with MaxRedirects -1 its failures can be told apart too, but a batch that
// meets a slot migration fails (as not applied) instead of following it.
func New(client redis.UniversalClient, opts ...Option) *Store {
	cfg := config{prefix: DefaultKeyPrefix, timeout: DefaultTimeout, maxBatch: DefaultMaxBatch, groups: DefaultGroups}
	for _, o := range opts {
		o.apply(&cfg)
	}
	s := &Store{
		client:     client,
		prefix:     escape(cfg.prefix),
		timeout:    cfg.timeout,
		maxBatch:   cfg.maxBatch,
		groupCount: cfg.groups,
		now:        cfg.now,
		routing:    routeTag,
		wake:       make(chan []*op, maxInFlight),
	}
	switch c := client.(type) {
	case *redis.Client:
		s.routing = routeOne
		// MaxRetries -1 reads back as 0; 0 (the default) as 3.
		s.oneAttempt = c != nil && c.Options().MaxRetries <= 0
	case *redis.ClusterClient:
		s.routing = routeSlot
		// A ClusterClient resends a pipeline after a lost reply, as it
		// follows redirects, up to MaxRedirects times (-1 reads back as 0).
		s.oneAttempt = c != nil && c.Options().MaxRedirects <= 0
	case *redis.Ring:
		// A Ring runs each shard's part of a pipeline once, on shard
		// clients without retries.
		s.oneAttempt = true
	}
	return s
}

// Take implements [bucket.Store]: it refills, decides and, if allowed,
// charges every bucket of req in one script run on the server's clock,
// together with whatever other operations are queued on the Store (see
// [Store]).
//
// A request with an [bucket.Request.ID] is checked against, and once
// applied recorded in, its marker key in the same script run, so a resent
// request is never applied twice within its [bucket.Request.IDWindow] of
// the server's clock.
//
// Take returns an error wrapping [bucket.ErrInvalidRequest] for a malformed
// request, and otherwise an error only when the call failed, which wraps
// exactly one of:
//
//   - [bucket.ErrNotApplied] when nothing was charged for certain: ctx was
//     done on entry, or ended while the request waited in the queue (the
//     request is then never sent); batch.lua found one of the request's
//     keys unreadable (a malformed value, another type) and failed this
//     request alone, before writing anything; or the client made one
//     attempt (MaxRetries -1, see [New]) and it failed before sending (a
//     dial error such as a refused connection, [redis.ErrPoolTimeout],
//     [redis.ErrPoolExhausted], [redis.ErrClosed]) or the server answered
//     with an error (a [redis.Error]: a script error, NOSCRIPT even after
//     the EVAL fallback, OOM, LOADING, CROSSSLOT, MOVED...), since Redis
//     and batch.lua refuse a batch only before writing any of it.
//   - [bucket.ErrOutcomeUnknown] when the request may have been charged:
//     its batch was sent and the reply was lost (the batch's timeout, see
//     [WithTimeout]; a read or write timeout; EOF; a reset connection) or
//     malformed; ctx ended while the batch was in flight (Take then returns
//     at once, and the batch goes on without it); the batch's deadline
//     passed while the client waited for a connection, which it cannot
//     tell from a lost reply (go-redis dials in the background and, unless
//     DialerRetries is 1, retries a refused dial 100 ms later); or the
//     client may have resent the batch (MaxRetries not -1), which makes any
//     failure's outcome unknown.
//
// The client's error stays in the chain, for [errors.Is] and [errors.As],
// and in the message. A caller resolves an unknown outcome by resending the
// request with the same ID, e.g. as [bucket.ModeAdjust]: the store then
// reports a duplicate if the first one was applied, and applies it
// otherwise.
//
// The client's retries (MaxRetries, 3 by default) resend a batch whose
// reply was lost. For requests with IDs that is harmless, since a resend
// is a duplicate, but a request without an ID may be charged twice: give
// every state-changing request an ID, or set MaxRetries to -1.
func (s *Store) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if err := req.Validate(); err != nil {
		return bucket.Decision{}, err
	}
	if err := s.ready(ctx); err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	reply, err := s.do(ctx, s.takeOp(req))
	if err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w", err)
	}
	// The levels live on the stack: Decide reads them and keeps nothing.
	var buf [bucket.MaxCharges]float64
	levels := buf[:len(req.Charges)]
	got, err := parseReply(reply, req.Charges, levels)
	if err != nil {
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w: %w", bucket.ErrOutcomeUnknown, err)
	}
	if got == duplicate {
		if req.ID == "" {
			return bucket.Decision{}, fmt.Errorf("redisstore: take: %w: batch.lua reported a duplicate of a request without an ID", bucket.ErrNotApplied)
		}
		return bucket.DecideDuplicate(req, levels), nil
	}
	// The script decided with the same arithmetic on the same levels; Decide
	// rebuilds the Decision (RetryAfter, ResetAfter) from them so that the
	// arithmetic lives in one place. A disagreement is a bug, never ignored:
	// what the script did is then known, but not what the caller should
	// believe.
	d := bucket.Decide(req, levels)
	if d.Allowed != (got == applied) {
		kind := bucket.ErrNotApplied
		if got == applied {
			kind = bucket.ErrOutcomeUnknown
		}
		return bucket.Decision{}, fmt.Errorf("redisstore: take: %w: batch.lua and bucket.Decide disagree on levels %v: script applied=%v, Decide allowed=%v", kind, slices.Clone(levels), got == applied, d.Allowed)
	}
	return d, nil
}

// takeArgSize is enough for the keys and the ARGV entry of any valid
// request: a group key and a marker key (an escaped prefix, a group tag of
// at most 22 bytes, a separator and, for the marker, two escaped names), a
// mode, a window and, per charge, a field and three numbers of at most 24
// bytes, each after a space.
const takeArgSize = 2*(3*maxVerbatim+32) + 32 + bucket.MaxCharges*(1+maxField+3*25)

// takeOp returns the operation of a valid request: its subject's group
// hash and marker key, and "<mode> <window or -> <field> <capacity> <rate>
// <cost>..." (see batch.lua). The keys and the argument share one
// allocation, and the operation's tag (the group's) is part of it.
func (s *Store) takeOp(req bucket.Request) *op {
	o := newOp()
	subject := escape(req.Subject)
	g := groupOf(subject, s.groupCount)
	var buf [takeArgSize]byte
	b := appendGroupKey(buf[:0], s.prefix, g)
	groupEnd := len(b)
	if req.ID != "" {
		b = appendIDKey(b, s.prefix, g, subject, escape(req.ID))
	}
	keysEnd := len(b)
	b = append(b, req.Mode.String()...)
	b = append(b, ' ')
	if req.ID == "" {
		b = append(b, '-')
	} else {
		b = strconv.AppendInt(b, ceilMicros(req.Window()), 10)
	}
	for _, c := range req.Charges {
		b = appendField(append(b, ' '), subject, escape(c.Bucket))
		b = appendFloat(append(b, ' '), c.Limit.Capacity)
		b = appendFloat(append(b, ' '), c.Limit.RefillPerSecond)
		b = appendFloat(append(b, ' '), c.Cost)
	}
	all := string(b)
	// The tag is what the group key holds between "{" and "}".
	o.tag = all[len(s.prefix)+len(":{") : groupEnd-len("}")]
	o.keys = append(o.keys, all[:groupEnd])
	if req.ID != "" {
		o.keys = append(o.keys, all[groupEnd:keysEnd])
	}
	o.arg = all[keysEnd:]
	return o
}

// verdict is batch.lua's answer to a bucket request.
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

// parseReply checks batch.lua's line for a bucket request, "<verdict> <state>"
// where verdict is 0, 1 or 2 and state is "<now> <bucket_1> ...
// <bucket_n>", single spaces apart, and reads into levels[i] the level of
// charges[i]'s bucket before the request, computed as batch.lua computes
// it (see level), for len(levels) buckets.
func parseReply(line string, charges []bucket.Charge, levels []float64) (verdict, error) {
	flag, state, found := strings.Cut(line, " ")
	v := verdict(0)
	switch flag {
	case "0":
		v = denied
	case "1":
		v = applied
	case "2":
		v = duplicate
	default:
		found = false
	}
	if !found {
		return denied, fmt.Errorf("malformed script reply: %q, want a verdict (0, 1 or 2) and the bucket state", line)
	}
	field, str, found := strings.Cut(state, " ")
	now, err := strconv.ParseFloat(field, 64)
	if !found || err != nil || math.IsNaN(now) || math.IsInf(now, 0) {
		return denied, fmt.Errorf("malformed script reply: bucket state %q, want the present and %d buckets", state, len(levels))
	}
	n := len(levels)
	for i := range n {
		field, str, found = strings.Cut(str, " ")
		if found == (i == n-1) {
			return denied, fmt.Errorf("malformed script reply: bucket state %q, want the present and %d buckets", state, n)
		}
		l, ok := level(field, now, charges[i].Limit)
		if !ok {
			return denied, fmt.Errorf("malformed script reply: bucket %d is %q, want \"-\", a stored value or \"=\" and a number", i, field)
		}
		levels[i] = l
	}
	return v, nil
}

// level returns the level at now of a bucket of limit lim as batch.lua
// shows it: "-" (full), a stored value with a class (the digits of its
// empty instant E and two digits of class) or "=" and E. It computes it as
// batch.lua does, min(capacity, (now - E) / 1e6 * rate), with the same
// float64 operations on the same numbers (E read as Lua's tonumber reads
// it, correctly rounded), so that it is the level the script decided on.
func level(shown string, now float64, lim bucket.Limit) (float64, bool) {
	if shown == "-" {
		return lim.Capacity, true
	}
	var digits string
	switch {
	case strings.HasPrefix(shown, "="):
		digits = shown[1:]
	case len(shown) >= 3 && allDigits(strings.TrimPrefix(shown, "-")):
		digits = shown[:len(shown)-2]
	default:
		return 0, false
	}
	e, err := strconv.ParseFloat(digits, 64)
	if err != nil || math.IsNaN(e) || math.IsInf(e, -1) {
		return 0, false
	}
	l := (now - e) / 1e6 * lim.RefillPerSecond
	// Lua's math.min(l, capacity) is l unless capacity < l.
	if lim.Capacity < l {
		l = lim.Capacity
	}
	return l, true
}

// allDigits reports whether s is at least three decimal digits and
// nothing else.
func allDigits(s string) bool {
	if len(s) < 3 {
		return false
	}
	for i := range len(s) {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// Acquire implements [bucket.LeaseStore]: in one script run on the server's
// clock, batched like [Store.Take], it deletes the expired leases of req's
// subject and name, renews req.ID's lease if it is live or acquires it if
// fewer than req.Limit leases are, and sets the lease set's TTL to its last
// expiry. The TTL is rounded up to a microsecond.
//
// Acquire returns an error wrapping [bucket.ErrInvalidRequest] for a
// malformed request, and otherwise an error only when the call failed,
// wrapping [bucket.ErrNotApplied] or [bucket.ErrOutcomeUnknown] by the
// rules of [Store.Take]. After an unknown outcome the lease may or may not
// be held; resending the same request is safe (it renews the lease), and
// so is releasing it.
func (s *Store) Acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	if err := req.Validate(); err != nil {
		return bucket.LeaseDecision{}, err
	}
	if err := s.ready(ctx); err != nil {
		return bucket.LeaseDecision{}, fmt.Errorf("redisstore: acquire: %w", err)
	}
	o := newOp()
	o.tag = escape(req.Subject)
	o.keys = append(o.keys, leaseKey(s.prefix, o.tag, escape(req.Name)))
	var buf [64 + 2*maxVerbatim]byte
	b := append(buf[:0], "acquire "...)
	b = strconv.AppendInt(b, int64(req.Limit), 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, ceilMicros(req.TTL), 10)
	b = append(b, ' ')
	b = append(b, escape(req.ID)...)
	o.arg = string(b)
	reply, err := s.do(ctx, o)
	if err != nil {
		return bucket.LeaseDecision{}, fmt.Errorf("redisstore: acquire: %w", err)
	}
	acquired, inUse, err := parseLeaseReply(reply)
	if err != nil {
		return bucket.LeaseDecision{}, fmt.Errorf("redisstore: acquire: %w: %w", bucket.ErrOutcomeUnknown, err)
	}
	return bucket.LeaseDecision{Acquired: acquired, InUse: inUse, Limit: req.Limit}, nil
}

// parseLeaseReply checks batch.lua's line for "acquire" (or "release"):
// "<acquired (0 or 1)> <in_use (>= acquired)>".
func parseLeaseReply(line string) (acquired bool, inUse int, err error) {
	flag, count, found := strings.Cut(line, " ")
	if !found || (flag != "0" && flag != "1") {
		return false, 0, fmt.Errorf("malformed script reply: %q, want an acquired flag (0 or 1) and an in-use count", line)
	}
	n, err := strconv.Atoi(count)
	if err != nil || n < 0 || (flag == "1" && n < 1) {
		return false, 0, fmt.Errorf("malformed script reply: in-use count %q, want an integer from %s", count, flag)
	}
	return flag == "1", n, nil
}

// Release implements [bucket.LeaseStore]: it removes the lease id of
// (subject, name), if there is one, in one script run batched like
// [Store.Take], and Redis deletes the lease set once it is empty.
//
// Release returns an error wrapping [bucket.ErrInvalidRequest] for
// malformed arguments, and otherwise an error only when the call failed,
// wrapping [bucket.ErrNotApplied] or [bucket.ErrOutcomeUnknown] by the
// rules of [Store.Take]; the lease may then still be held until its TTL
// passes, and releasing it again is safe.
func (s *Store) Release(ctx context.Context, subject, name, id string) error {
	if err := bucket.ValidateLease(subject, name, id); err != nil {
		return err
	}
	if err := s.ready(ctx); err != nil {
		return fmt.Errorf("redisstore: release: %w", err)
	}
	o := newOp()
	o.tag = escape(subject)
	o.keys = append(o.keys, leaseKey(s.prefix, o.tag, escape(name)))
	o.arg = "release " + escape(id)
	reply, err := s.do(ctx, o)
	if err != nil {
		return fmt.Errorf("redisstore: release: %w", err)
	}
	if _, _, err := parseLeaseReply(reply); err != nil {
		return fmt.Errorf("redisstore: release: %w: %w", bucket.ErrOutcomeUnknown, err)
	}
	return nil
}

// ready reports why s cannot queue an operation now, if it cannot; either
// way nothing was sent.
func (s *Store) ready(ctx context.Context) error {
	if s == nil || s.client == nil {
		return fmt.Errorf("%w: %w", bucket.ErrNotApplied, errors.New("Store has no Redis client (use New)"))
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", bucket.ErrNotApplied, err)
	}
	return nil
}

// appendFloat appends f formatted so that Lua's tonumber reads back
// exactly f.
func appendFloat(b []byte, f float64) []byte { return strconv.AppendFloat(b, f, 'g', -1, 64) }
