// Package interceptor rate limits Connect handlers built with connect-go v1
// (connectrpc.com/connect): [Interceptor] is a [connect.Interceptor] that
// charges each call to the token buckets its procedure draws from, per
// caller, and denies calls it cannot pay for with
// [connect.CodeResourceExhausted].
//
// Which buckets a procedure uses and what a call costs come from a
// [costmap.Map]; where buckets live comes from a [bucket.Store]. The
// interceptor knows neither which store it talks to nor how it is deployed.
// It is a thin adapter of package limiter, which holds the accounting and
// documents it; the module interceptor/v2 is the same adapter for connect-go
// v2.
package interceptor

import (
	"context"
	"errors"
	"net/http"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/limiter"
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
// allowed call's response carries RateLimit headers. Costs are settled to
// what the call really used when it ends, streams are charged as their
// messages flow, and store failures are handled by a failure policy: see
// [limiter.Limiter] for the rules.
//
// An Interceptor is safe for concurrent use; build one with [NewInterceptor],
// add it to handlers with [Interceptor.HandlerOptions] (or
// [connect.WithInterceptors], without deciding before the request is
// decoded), and call [Interceptor.Close] when done to flush settlements
// still waiting for the store.
type Interceptor struct {
	lim *limiter.Limiter
}

// NewInterceptor returns an Interceptor that charges calls in store
// according to costs. Both are required. Concurrency limits need a store
// that also implements [bucket.LeaseStore]. Unless the store is in-process
// ([bucket.InProcess], such as memstore), the default [FailLocal] policy
// needs a local store: pass [WithLocalStore].
func NewInterceptor(store bucket.Store, costs *costmap.Map, opts ...Option) (*Interceptor, error) {
	o := options{identify: defaultIdentity}
	for _, opt := range opts {
		opt.apply(&o)
	}
	if o.identify == nil {
		return nil, errors.New("interceptor: WithIdentityFunc(nil)")
	}
	identify := o.identify
	lim, err := limiter.New(store, costs, append(o.limiter,
		limiter.WithIdentityFunc(func(ctx context.Context, call *limiter.CallInfo) (Identity, error) {
			header, _ := call.Header.(http.Header)
			return identify(ctx, connect.Peer{Addr: call.PeerAddr, Protocol: call.Protocol}, header)
		}),
		// The identity function's *connect.Error goes to the client as is.
		limiter.WithPassError(func(err error) bool {
			var ce *connect.Error
			return errors.As(err, &ce)
		}),
	)...)
	if err != nil {
		return nil, err
	}
	return &Interceptor{lim: lim}, nil
}

// NewFromLimiter returns an Interceptor over an existing [limiter.Limiter],
// so that connect-go v1 and v2 handlers can share one (see the module
// interceptor/v2). The Interceptor does not close it.
func NewFromLimiter(lim *limiter.Limiter) *Interceptor { return &Interceptor{lim: lim} }

// Limiter returns the [limiter.Limiter] behind the Interceptor.
func (i *Interceptor) Limiter() *limiter.Limiter { return i.lim }

// Stats counts what the Interceptor could not do as planned; see
// [limiter.Stats].
type Stats = limiter.Stats

// Stats returns the Interceptor's counters. It is safe to call at any time.
func (i *Interceptor) Stats() Stats { return i.lim.Stats() }

// Store returns the store the Interceptor charges, behind its circuit
// breaker (unless it is in-process); see [limiter.Limiter.Store].
func (i *Interceptor) Store() bucket.Store { return i.lim.Store() }

// Close waits until the settlements queued for a retry are applied or
// given up on (one last attempt each, or until ctx is done) and stops the
// background work. Calls made after Close still work; what they cannot
// settle at once is dropped and counted.
func (i *Interceptor) Close(ctx context.Context) error { return i.lim.Close(ctx) }

// ReportUsage records, from inside a handler, that the current call used
// tokens from a bucket its procedure charges; see [limiter.ReportUsage].
func ReportUsage(ctx context.Context, bucketName string, tokens float64) error {
	return limiter.ReportUsage(ctx, bucketName, tokens)
}

// WrapUnary implements [connect.Interceptor].
func (i *Interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		spec := req.Spec()
		if spec.IsClient {
			return next(ctx, req)
		}
		var call *limiter.Call
		reserved := false
		if g, ok := takeGated(ctx); ok {
			// HandlerOptions' gate started the call from its headers.
			if g.refusal != nil {
				return nil, unaryError(ctx, req.Peer(), g.refusal)
			}
			call, reserved = g.call, g.reserved
		} else {
			var err error
			call, err = i.lim.Start(ctx, callInfo(spec, req.Peer(), req.Header()))
			if err != nil {
				return nil, unaryError(ctx, req.Peer(), connectError(err))
			}
		}
		if call == nil {
			return next(ctx, req)
		}
		// A handler that panics still ends the call: its slot is released
		// and its reservation kept.
		defer call.End(ctx, true)
		if !reserved {
			if err := call.Reserve(ctx, message(req.Any())); err != nil {
				return nil, unaryError(ctx, req.Peer(), connectError(err))
			}
		}
		resp, err := next(call.Context(ctx), req)
		if err == nil && resp != nil {
			_ = call.Sent(ctx, message(resp.Any())) // a unary call settles when it ends
		}
		d := call.End(ctx, err != nil)
		fields := i.lim.HeaderFields(d)
		if err != nil {
			// Only a *connect.Error carries headers; other errors are
			// left exactly as the handler returned them.
			var ce *connect.Error
			if errors.As(err, &ce) {
				setFields(ce.Meta(), fields)
				return resp, unaryError(ctx, req.Peer(), ce)
			}
			return resp, err
		}
		if resp != nil {
			setFields(resp.Header(), fields)
		}
		return resp, nil
	}
}

// WrapStreamingClient implements [connect.Interceptor]; client streams pass
// through.
func (i *Interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapStreamingHandler implements [connect.Interceptor]. See
// [limiter.Limiter] for how each kind of stream is charged.
func (i *Interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		call, err := i.lim.Start(ctx, callInfo(conn.Spec(), conn.Peer(), conn.RequestHeader()))
		if err != nil {
			err = connectError(err)
			copyMetaToHeader(conn, err)
			return err
		}
		if call == nil {
			return next(ctx, conn)
		}
		return i.handleStream(ctx, call, conn, next)
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
