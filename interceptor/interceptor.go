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
//   - The difference between the final and the reserved cost is applied to
//     every bucket in one store call: a refund never lifts a bucket above
//     capacity, and an overrun is always charged, even into debt, never
//     denied after the fact. A settlement that cannot reach the store is
//     retried in the background (see [WithSettleQueue]); each carries an ID
//     so that a retry never charges twice.
//
// Unary calls and server streams reserve when they start. On a server stream
// the actual usage is counted as messages are sent; once it passes the
// reservation, the excess is taken as it happens, and when a bucket cannot
// pay it the stream ends with CodeResourceExhausted after the message that
// crossed the line (see [WithStreamOverdraft]). Client and bidi streams
// charge every received message its cost instead.
//
// An Interceptor is safe for concurrent use; build one with [NewInterceptor],
// add it with [connect.WithInterceptors], and call [Interceptor.Close] when
// done to flush settlements still waiting for the store.
type Interceptor struct {
	store   bucket.Store
	leases  bucket.LeaseStore // nil if the store cannot limit concurrency
	costs   *costmap.Map
	cfg     config
	settler *settler
}

// NewInterceptor returns an Interceptor that charges calls in store
// according to costs. Both are required. Concurrency limits need a store
// that also implements [bucket.LeaseStore].
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
		warnBelow:   DefaultWarnFraction,
		settleQueue: DefaultSettleQueue,
		settleFor:   DefaultSettleRetryFor,
	}
	for _, o := range opts {
		o.apply(&cfg)
	}
	switch {
	case cfg.identify == nil:
		return nil, errors.New("interceptor: WithIdentityFunc(nil)")
	case cfg.timeout <= 0:
		return nil, fmt.Errorf("interceptor: store timeout must be greater than 0, got %v", cfg.timeout)
	case cfg.policy != FailOpen && cfg.policy != FailClosed:
		return nil, fmt.Errorf("interceptor: unknown failure policy %v", cfg.policy)
	case cfg.logger == nil:
		return nil, errors.New("interceptor: WithLogger(nil)")
	case !(cfg.warnBelow >= 0 && cfg.warnBelow < 1):
		return nil, fmt.Errorf("interceptor: warn fraction must be in [0, 1), got %v", cfg.warnBelow)
	case !(cfg.overdraft >= 0) || cfg.overdraft > 1e300:
		return nil, fmt.Errorf("interceptor: stream overdraft must be a finite number >= 0, got %v", cfg.overdraft)
	case cfg.settleQueue < 1:
		return nil, fmt.Errorf("interceptor: settle queue size must be at least 1, got %d", cfg.settleQueue)
	case cfg.settleFor <= 0:
		return nil, fmt.Errorf("interceptor: settle retry duration must be greater than 0, got %v", cfg.settleFor)
	}
	for _, p := range cfg.trusted {
		if !p.IsValid() {
			return nil, fmt.Errorf("interceptor: invalid trusted proxy prefix %v", p)
		}
	}
	i := &Interceptor{store: store, costs: costs, cfg: cfg}
	i.leases, _ = store.(bucket.LeaseStore)
	i.settler = newSettler(store, cfg)
	return i, nil
}

// Stats counts what the Interceptor could not do as planned.
type Stats struct {
	// SettlesRetried counts settlements that failed at first and were
	// queued for a retry.
	SettlesRetried uint64
	// SettlesDropped counts settlements given up on: the queue was full,
	// the retries ran out, or the Interceptor was closed. Each is logged
	// with its subject and amounts.
	SettlesDropped uint64
}

// Stats returns the Interceptor's counters.
func (i *Interceptor) Stats() Stats {
	return Stats{SettlesRetried: i.settler.retried.Load(), SettlesDropped: i.settler.dropped.Load()}
}

// Close waits until the settlements queued for a retry are applied or
// given up on (at most the settle retry duration, or until ctx is done) and
// stops the background worker. Calls made after Close still work; their
// failed settlements are dropped.
func (i *Interceptor) Close(ctx context.Context) error {
	return i.settler.close(ctx)
}

// WrapUnary implements [connect.Interceptor].
func (i *Interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		spec := req.Spec()
		if spec.IsClient {
			return next(ctx, req)
		}
		c, err := i.start(ctx, spec, req.Peer(), req.Header())
		if err != nil {
			return nil, err
		}
		if c == nil {
			return next(ctx, req)
		}
		defer c.releaseLease(ctx)
		msg, _ := req.Any().(proto.Message)
		if err := c.reserve(ctx, msg); err != nil {
			return nil, err
		}
		resp, err := next(withCall(ctx, c), req)
		if err == nil && resp != nil {
			if m, ok := resp.Any().(proto.Message); ok {
				c.addActual(ctx, m)
			}
		}
		d := c.settle(ctx, err != nil)
		if err != nil {
			// Only a *connect.Error carries headers; other errors are
			// left exactly as the handler returned them.
			var ce *connect.Error
			if errors.As(err, &ce) {
				i.setHeaders(ce.Meta(), d)
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
		c, err := i.start(ctx, conn.Spec(), conn.Peer(), conn.RequestHeader())
		if err != nil {
			copyMetaToHeader(conn, err)
			return err
		}
		if c == nil {
			return next(ctx, conn)
		}
		defer c.releaseLease(ctx)
		ctx, cancel := context.WithCancelCause(withCall(ctx, c))
		defer cancel(nil)
		s := &stream{StreamingHandlerConn: conn, call: c, ctx: ctx, cancel: cancel}
		if !c.perMessage() && !c.rule.Estimated() {
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
func (i *Interceptor) start(ctx context.Context, spec connect.Spec, peer connect.Peer, header http.Header) (*call, error) {
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
	c := newCall(i, spec, rule, tier, id.Subject())
	if conc, ok := rule.Concurrency(tier); ok {
		if err := c.acquireLease(ctx, conc); err != nil {
			return nil, err
		}
	}
	return c, nil
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
		id.IP = clientIP(peer.Addr, header, i.cfg.trusted)
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

// storeFailed applies the failure policy: nil lets the call through. The
// error text stays in the log; clients learn only that the limiter is
// unavailable.
func (i *Interceptor) storeFailed(ctx context.Context, procedure, subject, what string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		// The caller went away; that is not the store's fault.
		code := connect.CodeCanceled
		if errors.Is(ctxErr, context.DeadlineExceeded) {
			code = connect.CodeDeadlineExceeded
		}
		return connect.NewError(code, ctxErr)
	}
	attrs := []any{"procedure", procedure, "subject", subject, "op", what, "policy", i.cfg.policy.String(), "error", err}
	if errors.Is(err, context.DeadlineExceeded) {
		// The store may still apply the charge after we gave up on it.
		attrs = append(attrs, "charge", "unknown")
	}
	if i.cfg.policy == FailOpen {
		i.cfg.logger.WarnContext(ctx, "connectlimit: store failed; letting the call through uncharged", attrs...)
		return nil
	}
	i.cfg.logger.ErrorContext(ctx, "connectlimit: store failed; rejecting the call", attrs...)
	return connect.NewError(connect.CodeUnavailable, errors.New("connectlimit: rate limiter unavailable, retry later"))
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
