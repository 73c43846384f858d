// Package interceptor rate limits Connect handlers: [Interceptor] is a
// [connect.Interceptor] that charges each call to the token buckets its
// procedure draws from, per caller, and denies calls it cannot pay for with
// [connect.CodeResourceExhausted].
//
// Which buckets a procedure uses and what a call costs come from a
// [costmap.Map]; where buckets live comes from a [bucket.Store]. The
// interceptor knows neither which store it talks to nor how it is deployed.
package interceptor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

var _ connect.Interceptor = (*Interceptor)(nil)

// Interceptor is a server-side [connect.Interceptor] that rate limits calls.
// Client-side calls pass through untouched.
//
// For every call to a limited procedure it works out who is calling (see
// [Identity]) and the caller's tier, takes a concurrency slot if the
// procedure has a concurrency limit, and reserves the call's cost in every
// bucket the procedure draws from, all or nothing. A call that cannot be
// paid for is denied (see [DenialError]) and never reaches the handler; an
// allowed call's response carries RateLimit headers.
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
// pay it the stream ends with CodeResourceExhausted after the message that
// crossed the line (see [WithStreamOverdraft]). Client and bidi streams
// charge every received message its cost instead.
//
// # When the store fails
//
// Every store call has three outcomes: applied, not applied, or unknown (its
// reply was lost). The store sits behind a circuit breaker (unless it is
// in-process): after a few consecutive failures the interceptor stops
// calling it and answers every call by the [FailurePolicy] at in-memory
// speed, probing the store in the background until it answers. A call the
// store could not decide is handled by its procedure's policy: [FailLocal]
// (the default) decides it in a local store at a share of every limit,
// [FailOpen] lets it through, [FailClosed] refuses it with
// [connect.CodeUnavailable]. Under FailLocal and FailOpen the call's cost is
// billed to the store when it ends (post-paid), so limits catch up once the
// store is back. Every request carries an ID: an unknown outcome is resolved
// by resending the request with the same ID, which the store applies only
// if the first one was not, so no call is charged twice or lost. [Stats]
// counts all of it.
//
// An Interceptor is safe for concurrent use; build one with [NewInterceptor],
// add it with [connect.WithInterceptors], and call [Interceptor.Close] when
// done to flush settlements still waiting for the store.
type Interceptor struct {
	costs    *costmap.Map
	cfg      config
	back     *backend
	settler  *settler
	idWindow time.Duration
}

// NewInterceptor returns an Interceptor that charges calls in store
// according to costs. Both are required. Concurrency limits need a store
// that also implements [bucket.LeaseStore]. Unless the store is in-process
// ([bucket.InProcess], such as memstore), the default [FailLocal] policy
// needs a local store: pass [WithLocalStore].
func NewInterceptor(store bucket.Store, costs *costmap.Map, opts ...Option) (*Interceptor, error) {
	if store == nil {
		return nil, errors.New("interceptor: store is nil")
	}
	if costs == nil {
		return nil, errors.New("interceptor: cost map is nil")
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
	return &Interceptor{costs: costs, cfg: cfg, back: back, settler: newSettler(back, cfg, window), idWindow: window}, nil
}

func (cfg *config) validate(store bucket.Store, costs *costmap.Map) error {
	switch {
	case cfg.identify == nil:
		return errors.New("interceptor: WithIdentityFunc(nil)")
	case cfg.timeout < time.Millisecond:
		return fmt.Errorf("interceptor: store timeout must be at least 1ms, got %v", cfg.timeout)
	case cfg.policy > FailClosed:
		return fmt.Errorf("interceptor: unknown failure policy %v", cfg.policy)
	case !(cfg.localShare > 0 && cfg.localShare <= 1):
		return fmt.Errorf("interceptor: local share must be greater than 0 and at most 1, got %v", cfg.localShare)
	case cfg.logger == nil:
		return errors.New("interceptor: WithLogger(nil)")
	case cfg.logEvery < 0:
		return fmt.Errorf("interceptor: log interval must not be negative, got %v", cfg.logEvery)
	case !(cfg.warnBelow >= 0 && cfg.warnBelow < 1):
		return fmt.Errorf("interceptor: warn fraction must be in [0, 1), got %v", cfg.warnBelow)
	case !(cfg.overdraft >= 0 && cfg.overdraft <= bucket.MaxTokens):
		return fmt.Errorf("interceptor: stream overdraft must be a number from 0 to %g, got %v", bucket.MaxTokens, cfg.overdraft)
	case cfg.settleQueue < 1:
		return fmt.Errorf("interceptor: settle queue size must be at least 1, got %d", cfg.settleQueue)
	case cfg.settleFor <= 0 || cfg.settleFor > MaxSettleRetryFor:
		return fmt.Errorf("interceptor: settle retry duration must be greater than 0 and at most %v (request IDs are remembered a minute longer, at most %v), got %v",
			MaxSettleRetryFor, bucket.MaxIDWindow, cfg.settleFor)
	}
	for _, p := range cfg.trusted {
		if !p.IsValid() {
			return fmt.Errorf("interceptor: invalid trusted proxy prefix %v", p)
		}
	}
	if cfg.local != nil && !bucket.IsInProcess(cfg.local) {
		return errors.New("interceptor: WithLocalStore needs an in-process store (such as memstore.New()): a local store that can fail would fail with the store it stands in for")
	}
	if cfg.local == nil && !bucket.IsInProcess(store) && (cfg.policy == FailLocal || slices.Contains(costs.FailurePolicies(), costmap.PolicyLocal)) {
		return errors.New(`interceptor: failure policy "local" needs a local store: pass WithLocalStore(memstore.New()), or choose another policy with WithFailurePolicy`)
	}
	return nil
}

// Stats counts what an [Interceptor] could not do as planned. Every call
// that bypassed exact limiting in the store is counted in
// AllowedWithoutStore or LocalDecisions.
type Stats struct {
	// StoreFailures counts store calls that failed: not applied (including
	// those refused at once by the open circuit breaker) or of unknown
	// outcome.
	StoreFailures uint64
	// UnknownOutcomes counts store calls that may have been applied
	// without the interceptor learning it (a lost reply). Each is resolved
	// by a resend with the same request ID.
	UnknownOutcomes uint64
	// AllowedWithoutStore counts calls and stream messages that
	// [FailOpen] let through without a decision (their cost is billed
	// when they end).
	AllowedWithoutStore uint64
	// LocalDecisions counts decisions made by the local store under
	// [FailLocal], allowed or denied.
	LocalDecisions uint64
	// RejectedUnavailable counts calls and streams that [FailClosed]
	// refused with [connect.CodeUnavailable].
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
	// retries ran out, the store refused them as invalid, or the
	// Interceptor was closed. Each is logged with its subject and amounts
	// (at most one line per log interval; the others are counted).
	SettlesDropped uint64
}

// Stats returns the Interceptor's counters. It is safe to call at any time.
func (i *Interceptor) Stats() Stats {
	b := i.back
	st := Stats{
		StoreFailures:       b.storeFailures.Load(),
		UnknownOutcomes:     b.unknownOutcomes.Load(),
		AllowedWithoutStore: b.allowedWithoutStore.Load(),
		LocalDecisions:      b.localDecisions.Load(),
		RejectedUnavailable: b.rejectedUnavailable.Load(),
		SettlesRetried:      i.settler.retried.Load(),
		SettlesDropped:      i.settler.dropped.Load(),
	}
	if b.breaker != nil {
		bs := b.breaker.Stats()
		st.BreakerOpens, st.BreakerCloses, st.BreakerRejected = bs.Opens, bs.Closes, bs.Rejected
	}
	return st
}

// Store returns the store the Interceptor charges, behind its circuit
// breaker (unless it is in-process), for other decisions that should share
// the breaker, such as the server package's limit on failed
// authentications. Its calls are not counted in [Stats].
func (i *Interceptor) Store() bucket.Store { return i.back.main }

// Close waits until the settlements queued for a retry are applied or
// given up on (one last attempt each, or until ctx is done) and stops the
// background work (the settle queue and the circuit breaker's probe).
// Calls made after Close still work; what they cannot settle at once is
// dropped and counted.
func (i *Interceptor) Close(ctx context.Context) error {
	err := i.settler.close(ctx)
	i.back.close()
	return err
}

// WrapUnary implements [connect.Interceptor].
func (i *Interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		spec := req.Spec()
		if spec.IsClient {
			return next(ctx, req)
		}
		a, err := i.start(ctx, spec, req.Peer(), req.Header())
		if err != nil {
			return nil, unaryError(ctx, req.Peer(), err)
		}
		if a == nil {
			return next(ctx, req)
		}
		defer a.releaseLease(ctx)
		msg, _ := req.Any().(proto.Message)
		if err := a.reserve(ctx, msg); err != nil {
			return nil, unaryError(ctx, req.Peer(), err)
		}
		resp, err := next(withAccount(ctx, a), req)
		if err == nil && resp != nil {
			if m, ok := resp.Any().(proto.Message); ok {
				a.addActual(ctx, m)
			}
		}
		end := endOK
		if err != nil {
			end = endFailed
		}
		d := a.settle(ctx, end)
		if err != nil {
			// Only a *connect.Error carries headers; other errors are
			// left exactly as the handler returned them.
			var ce *connect.Error
			if errors.As(err, &ce) {
				i.setHeaders(ce.Meta(), d)
				return resp, unaryError(ctx, req.Peer(), ce)
			}
			return resp, err
		}
		if resp != nil {
			i.setHeaders(resp.Header(), d)
		}
		return resp, nil
	}
}

// WrapStreamingClient implements [connect.Interceptor]; client streams pass
// through.
func (i *Interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler implements [connect.Interceptor]. See [Interceptor]
// for how each kind of stream is charged.
func (i *Interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		a, err := i.start(ctx, conn.Spec(), conn.Peer(), conn.RequestHeader())
		if err != nil {
			copyMetaToHeader(conn, err)
			return err
		}
		if a == nil {
			return next(ctx, conn)
		}
		defer a.releaseLease(ctx)
		ctx, cancel := context.WithCancelCause(withAccount(ctx, a))
		defer cancel(nil)
		s := &stream{StreamingHandlerConn: conn, acct: a, ctx: ctx, cancel: cancel}
		if !a.perMessage && !a.rule.Estimated() {
			// Nothing to read from the request: reserve before the
			// handler runs at all.
			if err := s.reserve(nil); err != nil {
				return err
			}
		}
		err = next(ctx, s)
		return s.finish(err)
	}
}

// start identifies the caller of a limited procedure and takes its
// concurrency slot. It returns nil and no error for a procedure that is not
// limited.
func (i *Interceptor) start(ctx context.Context, spec connect.Spec, peer connect.Peer, header http.Header) (*account, error) {
	rule, err := i.rule(spec)
	if err != nil {
		i.cfg.logger.ErrorContext(ctx, "connectlimit: procedure is misconfigured", "procedure", spec.Procedure, "error", err)
		return nil, connect.NewError(connect.CodeInternal, errors.New("connectlimit: rate limit misconfigured for this procedure"))
	}
	if rule == nil {
		return nil, nil //nolint:nilnil // unlimited: no call and no error
	}
	id, tier, err := i.identify(ctx, peer, header)
	if err != nil {
		return nil, err
	}
	a := newAccount(i, spec.Procedure, spec.StreamType, rule, tier, id.Subject())
	if conc, ok := rule.Concurrency(tier); ok {
		if err := a.acquireLease(ctx, conc); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// identify returns the caller's identity and tier.
func (i *Interceptor) identify(ctx context.Context, peer connect.Peer, header http.Header) (Identity, *costmap.Tier, error) {
	id, err := i.cfg.identify(ctx, peer, header)
	if err != nil {
		if ce := new(connect.Error); errors.As(err, &ce) {
			return Identity{}, nil, ce
		}
		i.cfg.logger.ErrorContext(ctx, "connectlimit: identity function failed", "error", err)
		return Identity{}, nil, connect.NewError(connect.CodeInternal, errors.New("connectlimit: cannot identify caller"))
	}
	if !id.IP.IsValid() {
		id.IP = ClientIP(peer.Addr, header, i.cfg.trusted)
	}
	tier, err := i.costs.Tier(id.Tier, id.APIKey == "" && id.User == "")
	if err != nil {
		i.cfg.logger.ErrorContext(ctx, "connectlimit: caller's tier is not configured", "subject", id.Subject(), "error", err)
		return Identity{}, nil, connect.NewError(connect.CodeInternal, errors.New("connectlimit: caller's tier is not configured"))
	}
	return id, tier, nil
}

func (i *Interceptor) rule(spec connect.Spec) (*costmap.Rule, error) {
	if md, ok := spec.Schema.(protoreflect.MethodDescriptor); ok {
		return i.costs.Lookup(md)
	}
	return i.costs.LookupProcedure(spec.Procedure)
}

// copyMetaToHeader copies a *connect.Error's metadata into a stream's
// response headers: on a stream, error metadata travels as trailers in some
// protocols, and the RateLimit fields belong in headers.
func copyMetaToHeader(conn connect.StreamingHandlerConn, err error) {
	var ce *connect.Error
	if errors.As(err, &ce) {
		for k, v := range ce.Meta() {
			conn.ResponseHeader()[k] = v
		}
	}
}

// unaryError returns err for a unary call. gRPC sends an error's metadata
// as trailers, so for gRPC and gRPC-Web the limiter's fields are moved into
// the response headers, where HTTP clients and proxies look for them.
func unaryError(ctx context.Context, peer connect.Peer, err error) error {
	if peer.Protocol != connect.ProtocolGRPC && peer.Protocol != connect.ProtocolGRPCWeb {
		return err
	}
	var ce *connect.Error
	info, ok := connect.CallInfoForHandlerContext(ctx)
	if !ok || !errors.As(err, &ce) {
		return err
	}
	for _, name := range HeaderNames() {
		if values := ce.Meta().Values(name); len(values) > 0 {
			info.ResponseHeader()[http.CanonicalHeaderKey(name)] = values
			ce.Meta().Del(name)
		}
	}
	return err
}
