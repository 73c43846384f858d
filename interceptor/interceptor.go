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
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

var _ connect.Interceptor = (*Interceptor)(nil)

// Interceptor is a server-side [connect.Interceptor] that rate limits calls.
// For every call to a limited procedure it works out who is calling, asks
// the store to charge the procedure's buckets for that caller, and either
// lets the call through with RateLimit headers or denies it (see
// [DenialError]). Unary calls and streams are charged once, when they start.
// Client-side calls pass through untouched.
//
// An Interceptor is safe for concurrent use; build one with [NewInterceptor]
// and add it with [connect.WithInterceptors].
type Interceptor struct {
	store bucket.Store
	costs *costmap.Map
	cfg   config
}

// NewInterceptor returns an Interceptor that charges calls in store
// according to costs. Both are required.
func NewInterceptor(store bucket.Store, costs *costmap.Map, opts ...Option) (*Interceptor, error) {
	if store == nil {
		return nil, errors.New("interceptor: store is nil")
	}
	if costs == nil {
		return nil, errors.New("interceptor: cost map is nil")
	}
	cfg := config{identify: defaultIdentity, timeout: DefaultStoreTimeout, logger: slog.Default()}
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
	}
	for _, p := range cfg.trusted {
		if !p.IsValid() {
			return nil, fmt.Errorf("interceptor: invalid trusted proxy prefix %v", p)
		}
	}
	return &Interceptor{store: store, costs: costs, cfg: cfg}, nil
}

// WrapUnary implements [connect.Interceptor].
func (i *Interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		spec := req.Spec()
		if spec.IsClient {
			return next(ctx, req)
		}
		d, err := i.admit(ctx, spec, req.Peer(), req.Header())
		if err != nil {
			return nil, err
		}
		resp, err := next(ctx, req)
		if d == nil {
			return resp, err
		}
		if err != nil {
			// Only a *connect.Error carries headers; other errors are
			// left exactly as the handler returned them.
			var ce *connect.Error
			if errors.As(err, &ce) {
				setRateLimitHeaders(ce.Meta(), d)
			}
			return resp, err
		}
		if resp != nil {
			setRateLimitHeaders(resp.Header(), d)
		}
		return resp, nil
	}
}

// WrapStreamingClient implements [connect.Interceptor]; client streams pass
// through.
func (i *Interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler implements [connect.Interceptor]. A stream is charged
// its procedure's cost when it opens; the RateLimit headers are sent with
// the stream's response headers.
func (i *Interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		d, err := i.admit(ctx, conn.Spec(), conn.Peer(), conn.RequestHeader())
		if err != nil {
			// On a stream, an error's metadata travels as trailers in
			// some protocols; copy the denial headers into the real
			// response headers so every client sees them.
			var ce *connect.Error
			if errors.As(err, &ce) {
				for k, v := range ce.Meta() {
					conn.ResponseHeader()[k] = v
				}
			}
			return err
		}
		if d != nil {
			setRateLimitHeaders(conn.ResponseHeader(), d)
		}
		return next(ctx, conn)
	}
}

// admit charges a call. It returns the decision for an allowed, limited
// call; nil and no error for a call that is not limited or that passes
// because the store failed open; and the error to send otherwise.
func (i *Interceptor) admit(ctx context.Context, spec connect.Spec, peer connect.Peer, header http.Header) (*bucket.Decision, error) {
	rule, err := i.rule(spec)
	if err != nil {
		i.cfg.logger.ErrorContext(ctx, "connectlimit: procedure is misconfigured", "procedure", spec.Procedure, "error", err)
		return nil, connect.NewError(connect.CodeInternal, errors.New("connectlimit: rate limit misconfigured for this procedure"))
	}
	if rule == nil {
		return nil, nil //nolint:nilnil // unlimited: no decision and no error
	}
	id, err := i.cfg.identify(ctx, peer, header)
	if err != nil {
		if ce := new(connect.Error); errors.As(err, &ce) {
			return nil, ce
		}
		i.cfg.logger.ErrorContext(ctx, "connectlimit: identity function failed", "procedure", spec.Procedure, "error", err)
		return nil, connect.NewError(connect.CodeInternal, errors.New("connectlimit: cannot identify caller"))
	}
	if !id.IP.IsValid() {
		id.IP = clientIP(peer.Addr, header, i.cfg.trusted)
	}
	subject := id.Subject()
	storeCtx, cancel := context.WithTimeout(ctx, i.cfg.timeout)
	d, err := i.store.Take(storeCtx, bucket.Request{Subject: subject, Charges: rule.Charges})
	cancel()
	if err != nil {
		return nil, i.storeFailed(ctx, spec, subject, err)
	}
	if !d.Allowed {
		return nil, DenialError(subject, d)
	}
	return &d, nil
}

func (i *Interceptor) rule(spec connect.Spec) (*costmap.Rule, error) {
	if md, ok := spec.Schema.(protoreflect.MethodDescriptor); ok {
		return i.costs.Lookup(md)
	}
	return i.costs.LookupProcedure(spec.Procedure), nil
}

// storeFailed applies the failure policy. The error text stays in the log:
// clients learn only that the limiter is unavailable.
func (i *Interceptor) storeFailed(ctx context.Context, spec connect.Spec, subject string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		// The caller went away; that is not the store's fault.
		code := connect.CodeCanceled
		if errors.Is(ctxErr, context.DeadlineExceeded) {
			code = connect.CodeDeadlineExceeded
		}
		return connect.NewError(code, ctxErr)
	}
	attrs := []any{"procedure", spec.Procedure, "subject", subject, "policy", i.cfg.policy.String(), "error", err}
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
