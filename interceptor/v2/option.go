package interceptor

import (
	"log/slog"
	"net/netip"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/limiter"
)

// Defaults, as in package limiter, which documents each.
const (
	// DefaultStoreTimeout is how long one store call may take once it is
	// sent, unless set with [WithStoreTimeout].
	DefaultStoreTimeout = limiter.DefaultStoreTimeout
	// StoreQueueWait is how long, beyond the store timeout, a call may wait
	// for its turn at a busy store before the failure policy answers it.
	StoreQueueWait = limiter.StoreQueueWait
	// DefaultLocalShare is the share of every limit a process enforces on
	// its own under [FailLocal], unless set with [WithLocalShare].
	DefaultLocalShare = limiter.DefaultLocalShare
	// DefaultWarnFraction is the level, as a fraction of capacity, below
	// which a response carries the Connectlimit-Warning header, unless set
	// with [WithWarnFraction].
	DefaultWarnFraction = limiter.DefaultWarnFraction
	// DefaultSettleQueue is how many settlements that could not reach the
	// store wait for a retry, unless set with [WithSettleQueue].
	DefaultSettleQueue = limiter.DefaultSettleQueue
	// DefaultSettleRetryFor is how long a settlement that could not reach
	// the store is retried, unless set with [WithSettleQueue].
	DefaultSettleRetryFor = limiter.DefaultSettleRetryFor
	// MaxSettleRetryFor is the longest settle retry duration.
	MaxSettleRetryFor = limiter.MaxSettleRetryFor
	// DefaultLogInterval is the most often store failures are logged,
	// unless set with [WithLogInterval].
	DefaultLogInterval = limiter.DefaultLogInterval
)

// FailurePolicy says what happens to a call when the store cannot decide;
// see [limiter.FailurePolicy].
type FailurePolicy = limiter.FailurePolicy

// The failure policies; see package limiter.
const (
	// FailLocal keeps limiting in this process at a share of every limit
	// while the store is failing, and bills calls to the store when they
	// end. It is the default.
	FailLocal = limiter.FailLocal
	// FailOpen lets a call through without a decision, and bills it when
	// it ends.
	FailOpen = limiter.FailOpen
	// FailClosed refuses a call with [connect.CodeUnavailable].
	FailClosed = limiter.FailClosed
)

// ParseFailurePolicy returns the policy named "local", "open" or "closed".
func ParseFailurePolicy(name string) (FailurePolicy, error) { return limiter.ParseFailurePolicy(name) }

// Option configures the interceptor of [NewServerInterceptor].
type Option interface {
	apply(*options)
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

type options struct {
	limiter  []limiter.Option
	identify IdentityFunc
}

func limiterOption(o limiter.Option) Option {
	return optionFunc(func(opts *options) { opts.limiter = append(opts.limiter, o) })
}

// WithWarnFraction sets the level, as a fraction of capacity in [0, 1),
// below which a call's response carries the [HeaderWarning] header naming
// the buckets that are running low, so clients can slow down before they are
// denied. The default is [DefaultWarnFraction]; 0 disables the header.
func WithWarnFraction(f float64) Option { return limiterOption(limiter.WithWarnFraction(f)) }

// WithStreamOverdraft sets how many tokens beyond its reservation a server
// stream may use, when its bucket cannot pay for them, before it is ended
// with [connect.CodeResourceExhausted]. The overdraft is charged when the
// stream ends, so the bucket goes into debt. The default is 0: the stream
// ends after the first message its bucket cannot pay for.
func WithStreamOverdraft(tokens float64) Option {
	return limiterOption(limiter.WithStreamOverdraft(tokens))
}

// WithSettleQueue sets how many settlements that failed to reach the store
// may wait to be retried in the background, and for how long each is
// retried, at most [MaxSettleRetryFor]; see [limiter.WithSettleQueue]. The
// defaults are [DefaultSettleQueue] and [DefaultSettleRetryFor].
func WithSettleQueue(size int, retryFor time.Duration) Option {
	return limiterOption(limiter.WithSettleQueue(size, retryFor))
}

// WithIdentityFunc replaces the default way of telling who a call is from.
// By default the interceptor uses the [Identity] that authentication code
// stored in the context with [ContextWithIdentity] (an earlier server
// interceptor, or HTTP middleware in front of the server), and otherwise
// the client's IP address.
func WithIdentityFunc(f IdentityFunc) Option {
	return optionFunc(func(o *options) { o.identify = f })
}

// WithTrustedProxies sets the networks of the reverse proxies in front of
// the server. When a call arrives from one of them, the client IP is taken
// from X-Forwarded-For: the rightmost address that is not itself a trusted
// proxy. By default no proxy is trusted and X-Forwarded-For is ignored,
// since any client can send it.
func WithTrustedProxies(prefixes ...netip.Prefix) Option {
	return limiterOption(limiter.WithTrustedProxies(prefixes...))
}

// WithFailurePolicy sets what happens to calls when the store fails, times
// out or its circuit breaker is open, for every procedure whose
// configuration sets no failure_policy of its own. The default is
// [FailLocal], which needs a local store ([WithLocalStore]) unless the
// store itself is in-process (see [bucket.InProcess]).
func WithFailurePolicy(p FailurePolicy) Option { return limiterOption(limiter.WithFailurePolicy(p)) }

// WithLocalStore sets the in-process store (such as memstore.New()) that
// decides calls under [FailLocal] while the store is failing; see
// [limiter.WithLocalStore]. There is no default.
func WithLocalStore(s bucket.Store) Option { return limiterOption(limiter.WithLocalStore(s)) }

// WithLocalShare sets the share, in (0, 1], of every limit that one process
// enforces on its own under [FailLocal]. With n instances, an outage admits
// at most n × share × limit per caller. The default is [DefaultLocalShare].
func WithLocalShare(share float64) Option { return limiterOption(limiter.WithLocalShare(share)) }

// WithDenialCache turns off (false) or on (true, the default) the local
// denial cache in front of a store that is not in-process: a caller the
// store denied is denied again in this process, without a store round trip,
// until its buckets could pay. It never over-admits; see
// [limiter.WithDenialCache] for what it may under-admit.
func WithDenialCache(enabled bool) Option { return limiterOption(limiter.WithDenialCache(enabled)) }

// WithStoreTimeout sets how long one store call may take once it is sent;
// the default is [DefaultStoreTimeout]. See [limiter.WithStoreTimeout].
func WithStoreTimeout(d time.Duration) Option { return limiterOption(limiter.WithStoreTimeout(d)) }

// WithLogger sets where store failures and misconfigurations are logged.
// The default is [slog.Default].
func WithLogger(l *slog.Logger) Option { return limiterOption(limiter.WithLogger(l)) }

// WithLogInterval sets the most often store failures are logged. The
// default is [DefaultLogInterval].
func WithLogInterval(d time.Duration) Option { return limiterOption(limiter.WithLogInterval(d)) }
