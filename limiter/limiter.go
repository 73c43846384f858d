// Package limiter is connectlimit's per-call accounting, independent of
// connect-go's major version: who a call is from, which buckets its
// procedure draws from, the reservation, the settlement to the actual usage,
// a stream's per-message charges and cut-off, concurrency leases, the
// RateLimit header fields, denial errors, and what happens when the store
// fails. The interceptor packages are thin adapters of it: package
// interceptor for connect-go v1 (connectrpc.com/connect) and the module
// interceptor/v2 for connect-go v2 (connectrpc.com/connect/v2). Most
// programs use those; this package is for the adapters, and for code that
// needs one [Limiter] behind handlers of both majors.
//
// A [Limiter] charges calls in a [bucket.Store] according to a
// [costmap.Map]. For each call an adapter calls [Limiter.Start], then the
// [Call]'s methods as the call runs: [Call.Reserve] before the handler of a
// unary call or a server stream, [Call.Received] for every message a stream
// receives, [Call.Sent] after every message it sends, and [Call.End] when
// the handler returns. A [Stream] helps adapters keep a stream's response
// headers and its cut-off error consistent while Receive and Send run in
// two goroutines at once.
//
// # When the store fails
//
// Every store call has three outcomes: applied, not applied, or unknown (its
// reply was lost). The store sits behind a circuit breaker (unless it is
// in-process): after a few consecutive failures the limiter stops calling it
// and answers every call by the [FailurePolicy] at in-memory speed, probing
// the store in the background until it answers. A call the store could not
// decide is handled by its procedure's policy: [FailLocal] (the default)
// decides it in a local store at a share of every limit, [FailOpen] lets it
// through, [FailClosed] refuses it with unavailable. Under FailLocal and
// FailOpen the call's cost is billed to the store when it ends (post-paid),
// so limits catch up once the store is back. Every request carries an ID:
// an unknown outcome is resolved by resending the request with the same ID,
// which the store applies only if the first one was not, so no call is
// charged twice or lost. [Limiter.Stats] counts all of it.
package limiter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

// Limiter charges calls to the token buckets their procedures draw from,
// per caller, and settles them to what they really used. Build one with
// [New]; it is safe for concurrent use. Call [Limiter.Close] when done to
// flush settlements still waiting for the store.
//
// Costs are settled after the call. The rules:
//   - A charge is metered when it has an actual expression or the handler
//     reported usage for its bucket with [ReportUsage]. Its final cost is the
//     sum of the expression over the response messages sent plus what the
//     handler reported.
//   - A charge that is not metered keeps its reserved cost, except that
//     when the handler returns an error an estimated charge (one priced by
//     an estimate expression) is refunded in full: errors before any work
//     are the common case, and a handler that did work before failing says
//     so with ReportUsage. Fixed costs are never refunded.
//   - The difference between the final cost and what the store holds for
//     the call is applied to every bucket in one store call: a refund never
//     lifts a bucket above capacity, and an overrun is always charged, even
//     into debt, never denied after the fact. A settlement that cannot
//     reach the store is retried in the background (see [WithSettleQueue]);
//     each carries an ID so that a retry never charges twice.
//
// Unary calls and server streams reserve when they start. On a server stream
// the actual usage is counted as messages are sent; once it passes the
// reservation, the excess is taken as it happens, and when a bucket cannot
// pay it the stream ends with resource_exhausted after the message that
// crossed the line (see [WithStreamOverdraft]). Client and bidi streams
// charge every received message its cost instead.
type Limiter struct {
	costs    *costmap.Map
	cfg      config
	back     *backend
	settler  *settler
	idWindow time.Duration
}

// New returns a Limiter that charges calls in store according to costs.
// Both are required. Concurrency limits need a store that also implements
// [bucket.LeaseStore]. Unless the store is in-process ([bucket.InProcess],
// such as memstore), the default [FailLocal] policy needs a local store:
// pass [WithLocalStore].
func New(store bucket.Store, costs *costmap.Map, opts ...Option) (*Limiter, error) {
	if store == nil {
		return nil, errors.New("limiter: store is nil")
	}
	if costs == nil {
		return nil, errors.New("limiter: cost map is nil")
	}
	cfg := config{
		identify:    defaultIdentity,
		timeout:     DefaultStoreTimeout,
		logger:      slog.Default(),
		logEvery:    DefaultLogInterval,
		localShare:  DefaultLocalShare,
		warnBelow:   DefaultWarnFraction,
		settleQueue: DefaultSettleQueue,
		settleFor:   DefaultSettleRetryFor,
		now:         time.Now,
	}
	for _, o := range opts {
		o.apply(&cfg)
	}
	if err := cfg.validate(store, costs); err != nil {
		return nil, err
	}
	back := newBackend(store, cfg)
	window := cfg.settleFor + idWindowSlack
	return &Limiter{costs: costs, cfg: cfg, back: back, settler: newSettler(back, cfg, window), idWindow: window}, nil
}

func (cfg *config) validate(store bucket.Store, costs *costmap.Map) error {
	switch {
	case cfg.identify == nil:
		return errors.New("limiter: WithIdentityFunc(nil)")
	case cfg.timeout < time.Millisecond:
		return fmt.Errorf("limiter: store timeout must be at least 1ms, got %v", cfg.timeout)
	case cfg.policy > FailClosed:
		return fmt.Errorf("limiter: unknown failure policy %v", cfg.policy)
	case !(cfg.localShare > 0 && cfg.localShare <= 1):
		return fmt.Errorf("limiter: local share must be greater than 0 and at most 1, got %v", cfg.localShare)
	case cfg.logger == nil:
		return errors.New("limiter: WithLogger(nil)")
	case cfg.logEvery < 0:
		return fmt.Errorf("limiter: log interval must not be negative, got %v", cfg.logEvery)
	case !(cfg.warnBelow >= 0 && cfg.warnBelow < 1):
		return fmt.Errorf("limiter: warn fraction must be in [0, 1), got %v", cfg.warnBelow)
	case !(cfg.overdraft >= 0 && cfg.overdraft <= bucket.MaxTokens):
		return fmt.Errorf("limiter: stream overdraft must be a number from 0 to %g, got %v", bucket.MaxTokens, cfg.overdraft)
	case cfg.settleQueue < 1:
		return fmt.Errorf("limiter: settle queue size must be at least 1, got %d", cfg.settleQueue)
	case cfg.settleFor <= 0 || cfg.settleFor > MaxSettleRetryFor:
		return fmt.Errorf("limiter: settle retry duration must be greater than 0 and at most %v (request IDs are remembered a minute longer, at most %v), got %v",
			MaxSettleRetryFor, bucket.MaxIDWindow, cfg.settleFor)
	}
	for _, p := range cfg.trusted {
		if !p.IsValid() {
			return fmt.Errorf("limiter: invalid trusted proxy prefix %v", p)
		}
	}
	if cfg.local != nil && !bucket.IsInProcess(cfg.local) {
		return errors.New("limiter: WithLocalStore needs an in-process store (such as memstore.New()): a local store that can fail would fail with the store it stands in for")
	}
	if cfg.local == nil && !bucket.IsInProcess(store) && (cfg.policy == FailLocal || slices.Contains(costs.FailurePolicies(), costmap.PolicyLocal)) {
		return errors.New(`limiter: failure policy "local" needs a local store: pass WithLocalStore(memstore.New()), or choose another policy with WithFailurePolicy`)
	}
	return nil
}

// Stats counts what a [Limiter] could not do as planned. Every call that
// bypassed exact limiting in the store is counted in AllowedWithoutStore or
// LocalDecisions.
type Stats struct {
	// StoreFailures counts store calls that failed: not applied (including
	// those refused at once by the open circuit breaker) or of unknown
	// outcome.
	StoreFailures uint64
	// UnknownOutcomes counts store calls that may have been applied
	// without the limiter learning it (a lost reply). Each is resolved by a
	// resend with the same request ID.
	UnknownOutcomes uint64
	// AllowedWithoutStore counts calls and stream messages that
	// [FailOpen] let through without a decision (their cost is billed
	// when they end).
	AllowedWithoutStore uint64
	// LocalDecisions counts decisions made by the local store under
	// [FailLocal], allowed or denied.
	LocalDecisions uint64
	// RejectedUnavailable counts calls and streams that [FailClosed]
	// refused with unavailable.
	RejectedUnavailable uint64
	// BreakerOpens and BreakerCloses count the circuit breaker's
	// transitions: the store was given up on, and came back.
	BreakerOpens, BreakerCloses uint64
	// BreakerRejected counts store calls the open circuit breaker answered
	// at once, without trying the store (they are also StoreFailures).
	BreakerRejected uint64
	// SettlesRetried counts settlements, resolutions of unknown outcomes,
	// post-paid bills and lease releases that could not be applied at once
	// and were queued for a background retry.
	SettlesRetried uint64
	// SettlesDropped counts those given up on: the queue was full, the
	// retries ran out, the store refused them as invalid, or the Limiter
	// was closed. Each is logged with its subject and amounts (at most one
	// line per log interval; the others are counted).
	SettlesDropped uint64
	// DeniedLocally counts calls and stream messages the local denial cache
	// denied without asking the store (see [WithDenialCache]); they never
	// admit, so they bypass nothing. DenialCacheStoreCalls counts the store
	// calls made through the cache, and DenialCacheEvictions the entries it
	// dropped to stay within its bound.
	DeniedLocally, DenialCacheStoreCalls, DenialCacheEvictions uint64
}

// Stats returns the Limiter's counters. It is safe to call at any time.
func (l *Limiter) Stats() Stats {
	b := l.back
	st := Stats{
		StoreFailures:       b.storeFailures.Load(),
		UnknownOutcomes:     b.unknownOutcomes.Load(),
		AllowedWithoutStore: b.allowedWithoutStore.Load(),
		LocalDecisions:      b.localDecisions.Load(),
		RejectedUnavailable: b.rejectedUnavailable.Load(),
		SettlesRetried:      l.settler.retried.Load(),
		SettlesDropped:      l.settler.dropped.Load(),
	}
	if b.breaker != nil {
		bs := b.breaker.Stats()
		st.BreakerOpens, st.BreakerCloses, st.BreakerRejected = bs.Opens, bs.Closes, bs.Rejected
	}
	if b.denials != nil {
		ds := b.denials.Stats()
		st.DeniedLocally, st.DenialCacheStoreCalls, st.DenialCacheEvictions = ds.LocalDenials, ds.StoreCalls, ds.Evictions
	}
	return st
}

// Store returns the store the Limiter charges, behind its circuit breaker
// and its denial cache (unless it is in-process), for other decisions that should share the
// breaker, such as the server package's limit on failed authentications.
// Its calls are not counted in [Stats].
func (l *Limiter) Store() bucket.Store { return l.back.main }

// Close waits until the settlements queued for a retry are applied or
// given up on (one last attempt each, or until ctx is done) and stops the
// background work (the settle queue and the circuit breaker's probe). Calls
// made after Close still work; what they cannot settle at once is dropped
// and counted.
func (l *Limiter) Close(ctx context.Context) error {
	err := l.settler.close(ctx)
	l.back.close()
	return err
}

// StreamType says which side of a call sends several messages. Its values
// are those of connect-go's StreamType, in both majors.
type StreamType uint8

// The stream types.
const (
	Unary        StreamType = 0b00
	ClientStream StreamType = 0b01
	ServerStream StreamType = 0b10
	BidiStream   StreamType = 0b11
)

// Header is read access to a call's request headers: [net/http.Header] and
// connect-go v2's *Header both have it.
type Header interface {
	Values(key string) []string
}

// CallInfo describes a call to [Limiter.Start] in terms that do not depend
// on connect-go's major.
type CallInfo struct {
	// Procedure is "/package.Service/Method".
	Procedure string
	// Method is the method's descriptor, from the handler's schema; nil
	// if unknown, when the procedure's rule must then need none.
	Method protoreflect.MethodDescriptor
	// StreamType is the call's kind of stream.
	StreamType StreamType
	// PeerAddr is the peer's "host:port".
	PeerAddr string
	// Protocol is "connect", "grpc" or "grpcweb".
	Protocol string
	// Header is the request's headers.
	Header Header
}

// Start begins the accounting of a call: it finds the procedure's rule,
// identifies the caller and takes its concurrency slot. It returns a nil
// Call and no error for a procedure that is not limited, and an *[Error]
// (a denial, unavailable, a misconfiguration) for a call that must not run.
// The caller must call [Call.End] once the call is over (or refused after
// Start).
func (l *Limiter) Start(ctx context.Context, info *CallInfo) (*Call, error) {
	rule, err := l.rule(info)
	if err != nil {
		l.cfg.logger.ErrorContext(ctx, "connectlimit: procedure is misconfigured", "procedure", info.Procedure, "error", err)
		return nil, internalError("rate limit misconfigured for this procedure")
	}
	if rule == nil {
		return nil, nil //nolint:nilnil // unlimited: no call and no error
	}
	id, tier, err := l.identify(ctx, info)
	if err != nil {
		return nil, err
	}
	c := newCall(l, info.Procedure, info.StreamType, rule, tier, id.Subject())
	if conc, ok := rule.Concurrency(tier); ok {
		if err := c.acquireLease(ctx, conc); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// identify returns the caller's identity and tier.
func (l *Limiter) identify(ctx context.Context, info *CallInfo) (Identity, *costmap.Tier, error) {
	id, err := l.cfg.identify(ctx, info)
	if err != nil {
		var refusal *Error
		if errors.As(err, &refusal) {
			return Identity{}, nil, refusal
		}
		// The adapters' identity functions may return errors of their own
		// connect-go major, which they recognise.
		if l.cfg.passError != nil && l.cfg.passError(err) {
			return Identity{}, nil, err
		}
		l.cfg.logger.ErrorContext(ctx, "connectlimit: identity function failed", "error", err)
		return Identity{}, nil, internalError("cannot identify caller")
	}
	if !id.IP.IsValid() {
		id.IP = ClientIP(info.PeerAddr, info.Header, l.cfg.trusted)
	}
	tier, err := l.costs.Tier(id.Tier, id.APIKey == "" && id.User == "")
	if err != nil {
		l.cfg.logger.ErrorContext(ctx, "connectlimit: caller's tier is not configured", "subject", id.Subject(), "error", err)
		return Identity{}, nil, internalError("caller's tier is not configured")
	}
	return id, tier, nil
}

func (l *Limiter) rule(info *CallInfo) (*costmap.Rule, error) {
	if info.Method != nil {
		return l.costs.Lookup(info.Method)
	}
	return l.costs.LookupProcedure(info.Procedure)
}

// WithPassError makes the Limiter return as is the errors of the identity
// function for which pass reports true, instead of turning them into an
// internal error. The interceptor packages use it for the errors of their
// own connect-go major; by default only *[Error]s pass.
func WithPassError(pass func(error) bool) Option {
	return optionFunc(func(c *config) { c.passError = pass })
}
