package interceptor

import (
	"context"
	"net/http"
	"sync/atomic"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/limiter"
)

// HandlerOptions returns the options that limit a handler: the Interceptor
// itself and a request gate ([connect.WithRequestGate]) that decides unary
// calls from their headers, before their request message is read. Prefer it
// to [connect.WithInterceptors]:
//
//	path, handler := aiservicev1connect.NewAIServiceHandler(svc, limiter.HandlerOptions())
//
// For a unary call the gate works out who is calling, takes the
// procedure's concurrency slot and, when no cost is estimated from the
// request, reserves the call's cost, all from the headers. A call it denies
// is refused before its body is read or unmarshalled, so a flood of denied
// calls costs no decoding (and, with a denial cache in front of the store,
// no store round trip either). Calls whose cost needs the request message
// are reserved by the Interceptor, as without the gate. Streams need no
// gate: connect-go reads a stream's messages only when its handler asks,
// after the Interceptor has reserved.
//
// Over gRPC and gRPC-Web a denial's RateLimit and Retry-After fields belong
// in the response headers, which connect-go lets only the Interceptor set,
// so there the gate hands its denial to the Interceptor, which returns it
// without running the handler: still no store call, but the request is
// decoded first. A call the gate started is always ended, by the
// Interceptor or, if the handler fails before the Interceptor runs (a
// request that does not decode), when the call's context ends: its
// concurrency slot is released and its fixed cost kept, as for any call
// whose handler fails.
//
// Both must run on the same handler: the gate hands its work to the
// Interceptor through the call's context. Do not add the gate without the
// Interceptor (HandlerOptions adds both).
func (i *Interceptor) HandlerOptions() connect.HandlerOption {
	return connect.WithHandlerOptions(connect.WithRequestGate(i.gate), connect.WithInterceptors(i))
}

// gateKey is the context key of a call's [gated] state.
type gateKey struct{}

// gated is what the gate decided for a unary call, for the Interceptor.
type gated struct {
	call     *limiter.Call // nil for a procedure that is not limited
	reserved bool          // the call's cost is reserved
	refusal  error         // the gate's denial, to return without running the handler
	// handed is set by the Interceptor that takes the state over, so that
	// a second Interceptor on the handler ignores it.
	handed atomic.Bool
	// ending is set by whoever ends the call: the Interceptor, or the
	// cleanup when the request ended before the Interceptor ran.
	ending atomic.Bool
	stop   func() bool // stops the cleanup
}

// gate is the [connect.RequestGateFunc] of [Interceptor.HandlerOptions].
func (i *Interceptor) gate(ctx context.Context, spec connect.Spec, peer connect.Peer, header http.Header) (context.Context, error) {
	if spec.IsClient || spec.StreamType != connect.StreamTypeUnary {
		return ctx, nil
	}
	// Only over the Connect protocol does connect-go send a unary error's
	// metadata, the RateLimit fields, as headers.
	early := peer.Protocol == connect.ProtocolConnect
	refuse := func(err error) (context.Context, error) {
		err = connectError(err)
		if early {
			return nil, err
		}
		return context.WithValue(ctx, gateKey{}, &gated{refusal: err}), nil
	}
	call, err := i.lim.Start(ctx, callInfo(spec, peer, header))
	if err != nil {
		return refuse(err)
	}
	g := &gated{call: call}
	if call == nil {
		return context.WithValue(ctx, gateKey{}, g), nil
	}
	if call.ReservesOnStart() {
		if err := call.Reserve(ctx, nil); err != nil {
			call.End(ctx, true)
			return refuse(err)
		}
		g.reserved = true
	}
	// If the handler fails before the Interceptor runs (a request that
	// does not decode), nothing else ends the call: end it when the
	// request is over.
	g.stop = context.AfterFunc(ctx, func() {
		if g.ending.CompareAndSwap(false, true) {
			call.End(context.WithoutCancel(ctx), true)
		}
	})
	return context.WithValue(ctx, gateKey{}, g), nil
}

// takeGated returns what the gate decided for the call of ctx, to the
// first Interceptor that asks; ok is false if the gate did not run. A call
// that ended before the Interceptor ran has a nil call and the context's
// error as its refusal.
func takeGated(ctx context.Context) (g *gated, ok bool) {
	g, ok = ctx.Value(gateKey{}).(*gated)
	if !ok || !g.handed.CompareAndSwap(false, true) {
		return nil, false
	}
	if g.stop != nil {
		g.stop()
		if !g.ending.CompareAndSwap(false, true) {
			// The request is over and the cleanup ended the call.
			return &gated{refusal: context.Cause(ctx)}, true
		}
	}
	return g, true
}
