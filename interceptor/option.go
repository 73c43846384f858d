package interceptor

import (
	"context"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"connectrpc.com/connect"
)

// DefaultStoreTimeout bounds each store call unless set with
// [WithStoreTimeout]. It is far above a healthy Redis round trip and far
// below what a user would notice, so a dead or hung store costs an RPC at
// most this long before the [FailurePolicy] applies.
const DefaultStoreTimeout = 100 * time.Millisecond

// FailurePolicy says what happens to a call when the store cannot decide:
// it failed, or did not answer within the store timeout. A store failure is
// never reported to clients as a quota denial.
type FailurePolicy uint8

const (
	// FailOpen lets the call through without charging it, and logs the
	// failure. It is the default: an outage of the limiter's store does not
	// become an outage of the service.
	FailOpen FailurePolicy = iota
	// FailClosed rejects the call with [connect.CodeUnavailable], for
	// procedures where an unmetered call costs more than a failed one.
	FailClosed
)

// String returns "open" or "closed".
func (p FailurePolicy) String() string {
	switch p {
	case FailOpen:
		return "open"
	case FailClosed:
		return "closed"
	default:
		return "FailurePolicy(" + strconv.Itoa(int(p)) + ")"
	}
}

// IdentityFunc says who a call is from. It runs once per limited call,
// before the handler. It may leave [Identity.IP] unset: the interceptor
// fills it from the peer address. A returned *connect.Error is sent to the
// client as is; any other error becomes [connect.CodeInternal].
type IdentityFunc func(ctx context.Context, peer connect.Peer, header http.Header) (Identity, error)

// Option configures an [Interceptor].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	identify    IdentityFunc
	trusted     []netip.Prefix
	policy      FailurePolicy
	timeout     time.Duration
	logger      *slog.Logger
	warnBelow   float64
	overdraft   float64
	settleQueue int
	settleFor   time.Duration
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

// WithWarnFraction sets the level, as a fraction of capacity in [0, 1),
// below which a call's response carries the [HeaderWarning] header naming
// the buckets that are running low, so clients can slow down before they are
// denied. The default is [DefaultWarnFraction]; 0 disables the header.
func WithWarnFraction(f float64) Option {
	return optionFunc(func(c *config) { c.warnBelow = f })
}

// WithStreamOverdraft sets how many tokens beyond its reservation a server
// stream may use, when its bucket cannot pay for them, before it is ended
// with [connect.CodeResourceExhausted]. The overdraft is charged when the
// stream ends, so the bucket goes into debt. The default is 0: the stream
// ends after the first message its bucket cannot pay for.
func WithStreamOverdraft(tokens float64) Option {
	return optionFunc(func(c *config) { c.overdraft = tokens })
}

// WithSettleQueue sets how many settlements (see [Interceptor]) that failed
// to reach the store may wait to be retried in the background, and for how
// long each is retried. Beyond either bound a settlement is dropped, logged
// and counted in [Stats]. The defaults are [DefaultSettleQueue] and
// [DefaultSettleRetryFor].
func WithSettleQueue(size int, retryFor time.Duration) Option {
	return optionFunc(func(c *config) { c.settleQueue, c.settleFor = size, retryFor })
}

// WithIdentityFunc replaces the default way of telling who a call is from.
// By default the interceptor uses the [Identity] that authentication
// middleware stored in the context (with [ContextWithIdentity], or as
// connectrpc.com/authn info; see [IdentityFromContext]) and otherwise the
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

// WithFailurePolicy sets what happens to calls when the store fails or
// times out. The default is [FailOpen].
func WithFailurePolicy(p FailurePolicy) Option {
	return optionFunc(func(c *config) { c.policy = p })
}

// WithStoreTimeout bounds each store call; the default is
// [DefaultStoreTimeout]. A call whose store decision takes longer is
// handled by the [FailurePolicy].
func WithStoreTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.timeout = d })
}

// WithLogger sets where store failures and misconfigurations are logged.
// The default is [slog.Default].
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}
