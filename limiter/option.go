package limiter

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

// DefaultStoreTimeout is how long one store call may take once it is sent,
// unless set with [WithStoreTimeout]. It is far above a healthy Redis round
// trip and far below what a user would notice.
const DefaultStoreTimeout = 100 * time.Millisecond

// StoreQueueWait is how long, beyond the store timeout, a call may wait for
// its turn at a busy store (a pooled connection, a batch slot) before the
// failure policy answers it. Waiting for a turn is not a store failure: a
// cold burst of calls queues, it does not fail open.
const StoreQueueWait = time.Second

// FailurePolicy says what happens to a call when the store cannot decide: it
// failed, did not answer within the store timeout, or its circuit breaker is
// open. A store failure is never reported to clients as a quota denial.
type FailurePolicy uint8

const (
	// FailLocal keeps limiting in this process while the store is failing:
	// each instance decides with a local store (see [WithLocalStore]) over
	// the same buckets and costs at a share of every limit (see
	// [WithLocalShare]), so that during an outage a caller gets at most
	// instances × share × limit across all instances. What the calls
	// really cost is billed to the store when they end (post-paid). It is
	// the default: an outage neither stops the service nor makes its LLM
	// calls free.
	FailLocal FailurePolicy = iota
	// FailOpen lets the call through without a decision, and bills its cost
	// to the store when it ends (post-paid), so the limits catch up once
	// the store is back. For procedures whose availability matters more
	// than their cost.
	FailOpen
	// FailClosed rejects the call with unavailable, for procedures where
	// an unmetered call costs more than a failed one.
	FailClosed
)

// String returns "local", "open" or "closed", as in the configuration file.
func (p FailurePolicy) String() string {
	switch p {
	case FailLocal:
		return costmap.PolicyLocal
	case FailOpen:
		return costmap.PolicyOpen
	case FailClosed:
		return costmap.PolicyClosed
	default:
		return "FailurePolicy(" + strconv.Itoa(int(p)) + ")"
	}
}

// ParseFailurePolicy returns the policy named "local", "open" or "closed".
func ParseFailurePolicy(name string) (FailurePolicy, error) {
	switch name {
	case costmap.PolicyLocal:
		return FailLocal, nil
	case costmap.PolicyOpen:
		return FailOpen, nil
	case costmap.PolicyClosed:
		return FailClosed, nil
	default:
		return 0, fmt.Errorf("limiter: failure policy must be local, open or closed, got %q", name)
	}
}

// DefaultLocalShare is the share of every limit a process enforces on its
// own under [FailLocal], unless set with [WithLocalShare]. With n instances,
// an outage admits at most n × DefaultLocalShare × limit; set the share to
// 1/n to keep that at the limit itself.
const DefaultLocalShare = 0.5

// IdentityFunc says who a call is from. It runs once per limited call,
// before the handler, and must be safe for concurrent use. It may leave
// [Identity.IP] unset: the limiter fills it from the peer address. A
// returned *[Error] is sent to the client as is; any other error becomes an
// internal error.
type IdentityFunc func(ctx context.Context, call *CallInfo) (Identity, error)

// Option configures a [Limiter].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	identify    IdentityFunc
	passError   func(error) bool
	trusted     []netip.Prefix
	policy      FailurePolicy
	local       bucket.Store
	localShare  float64
	timeout     time.Duration
	logger      *slog.Logger
	logEvery    time.Duration
	warnBelow   float64
	overdraft   float64
	settleQueue int
	settleFor   time.Duration
	noDenyCache bool
	// now is the clock of the settle queue's retry deadlines; tests
	// override it through export_test.go.
	now func() time.Time
}

// DefaultWarnFraction is the level, as a fraction of capacity, below which
// a response carries the Connectlimit-Warning header, unless set with
// [WithWarnFraction].
const DefaultWarnFraction = 0.1

// DefaultSettleQueue is how many settlements that could not reach the store
// wait for a retry, unless set with [WithSettleQueue].
const DefaultSettleQueue = 1024

// DefaultSettleRetryFor is how long a settlement that could not reach the
// store is retried before it is dropped, unless set with [WithSettleQueue].
const DefaultSettleRetryFor = time.Minute

// MaxSettleRetryFor is the longest settle retry duration: request IDs are
// remembered for the retry duration plus a minute (see [bucket.Request]),
// and at most [bucket.MaxIDWindow].
const MaxSettleRetryFor = bucket.MaxIDWindow - idWindowSlack

// idWindowSlack is how much longer than the settle retry duration a store
// remembers a request ID: a resend is never later than the retry duration
// after the first attempt, and a request stuck in a hung server's socket
// buffer is applied late by at most about this much.
const idWindowSlack = time.Minute

// DefaultLogInterval is the most often store failures are logged, unless set
// with [WithLogInterval]: the first failure is logged at once, the next
// ones as one line per interval with counts.
const DefaultLogInterval = 10 * time.Second

// WithWarnFraction sets the level, as a fraction of capacity in [0, 1),
// below which a call's response carries the [HeaderWarning] header naming
// the buckets that are running low, so clients can slow down before they are
// denied. The default is [DefaultWarnFraction]; 0 disables the header.
func WithWarnFraction(f float64) Option {
	return optionFunc(func(c *config) { c.warnBelow = f })
}

// WithStreamOverdraft sets how many tokens beyond its reservation a server
// stream may use, when its bucket cannot pay for them, before it is ended
// with resource_exhausted. The overdraft is charged when the
// stream ends, so the bucket goes into debt. The default is 0: the stream
// ends after the first message its bucket cannot pay for.
func WithStreamOverdraft(tokens float64) Option {
	return optionFunc(func(c *config) { c.overdraft = tokens })
}

// WithSettleQueue sets how many settlements (see [Limiter]) that failed
// to reach the store may wait to be retried in the background, and for how
// long each is retried, at most [MaxSettleRetryFor]. Beyond either bound a
// settlement is dropped, logged and counted in [Stats]. Settlements that
// certainly did not reach the store are merged per caller, so the queue
// holds one entry per caller during an outage. The defaults are
// [DefaultSettleQueue] and [DefaultSettleRetryFor]. The store remembers the
// ID of every settlement for the retry duration plus a minute, so a longer
// retry costs store memory.
func WithSettleQueue(size int, retryFor time.Duration) Option {
	return optionFunc(func(c *config) { c.settleQueue, c.settleFor = size, retryFor })
}

// WithIdentityFunc replaces the default way of telling who a call is from.
// By default the limiter uses the [Identity] that authentication middleware
// stored in the context with [ContextWithIdentity] (the interceptor
// packages also read connectrpc.com/authn's info), and otherwise the
// client's IP address.
func WithIdentityFunc(f IdentityFunc) Option {
	return optionFunc(func(c *config) { c.identify = f })
}

// WithTrustedProxies sets the networks of the reverse proxies in front of
// the server. When a call arrives from one of them, the client IP is taken
// from X-Forwarded-For: the rightmost address that is not itself a trusted
// proxy. By default no proxy is trusted and X-Forwarded-For is ignored,
// since any client can send it.
func WithTrustedProxies(prefixes ...netip.Prefix) Option {
	return optionFunc(func(c *config) { c.trusted = append(c.trusted, prefixes...) })
}

// WithFailurePolicy sets what happens to calls when the store fails, times
// out or its circuit breaker is open, for every procedure whose
// configuration sets no failure_policy of its own. The default is
// [FailLocal], which needs a local store ([WithLocalStore]) unless the
// store itself is in-process (see [bucket.InProcess]).
func WithFailurePolicy(p FailurePolicy) Option {
	return optionFunc(func(c *config) { c.policy = p })
}

// WithLocalStore sets the in-process store (such as memstore.New()) that
// decides calls under [FailLocal] while the store is failing. Its buckets
// are the same as the store's, with every capacity, refill rate and
// concurrency limit scaled by the local share. The limiter does not
// close it. There is no default: [New] fails when a procedure
// may fail locally and no local store is set, unless the main store is
// itself in-process (and so never fails).
func WithLocalStore(s bucket.Store) Option {
	return optionFunc(func(c *config) { c.local = s })
}

// WithLocalShare sets the share, in (0, 1], of every limit that one process
// enforces on its own under [FailLocal]. With n instances, an outage admits
// at most n × share × limit per caller (plus what the store had already
// admitted). The default is [DefaultLocalShare].
func WithLocalShare(share float64) Option {
	return optionFunc(func(c *config) { c.localShare = share })
}

// WithDenialCache turns the local denial cache on (the default) or off.
// In front of a store that is not in-process (Redis), the Limiter keeps
// the buckets the store denied, with their levels, and denies them again in
// this process, without a round trip, until they could pay the cost asked:
// an abusive caller costs no store call. It never admits what the store
// would deny; it may deny, for at most the wait the store's denial gave, a
// call that the store would now allow because another instance refunded
// tokens. See package [denycache] for the exact bounds. An in-process store
// (memstore) has no cache: it answers as fast.
//
// [denycache]: https://pkg.go.dev/github.com/connectlimit/connectlimit/bucket/denycache
func WithDenialCache(enabled bool) Option {
	return optionFunc(func(c *config) { c.noDenyCache = !enabled })
}

// WithStoreTimeout sets how long one store call may take once it is sent;
// the default is [DefaultStoreTimeout]. A call whose store does not answer
// in time has an unknown outcome, counts toward the circuit breaker and is
// handled by the [FailurePolicy]. Time spent waiting for a turn at a busy
// store is not counted (see [StoreQueueWait]); stores that queue calls time
// their own round trips, so give them the same timeout
// (redisstore.WithTimeout).
func WithStoreTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.timeout = d })
}

// WithLogger sets where store failures and misconfigurations are logged.
// The default is [slog.Default].
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}

// WithLogInterval sets the most often store failures are logged: the first
// one at once with its error, then at most one line per interval counting
// what failed and how each call was answered. The default is
// [DefaultLogInterval].
func WithLogInterval(d time.Duration) Option {
	return optionFunc(func(c *config) { c.logEvery = d })
}
