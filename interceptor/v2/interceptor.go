// Package interceptor rate limits Connect servers built with connect-go v2
// (connectrpc.com/connect/v2): [NewServerInterceptor] returns a
// [connect.ServerInterceptor] that charges each call to the token buckets
// its procedure draws from, per caller, and denies calls it cannot pay for
// with [connect.CodeResourceExhausted].
//
// It is the connect-go v2 twin of the root module's package interceptor
// (connect-go v1): both are thin adapters of package limiter, which holds
// the accounting and documents its rules, and they behave the same on the
// wire. One [limiter.Limiter] may serve handlers of both majors: build it
// with either constructor, or with [limiter.New], and pass it to the other
// ([NewServerInterceptorFromLimiter], interceptor.NewFromLimiter).
//
//	limit, limits, err := interceptor.NewServerInterceptor(store, costs)
//	defer limits.Close(ctx)
//	server := connect.NewServer(limit)
//	aiservicev1connect.RegisterAIServiceHandler(server, svc)
//	interceptor.RegisterQuotaService(server, limits)
//	connecthttp.Mount(mux, server)
package interceptor

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"

	"connectrpc.com/connect/v2"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/limiter"
)

// NewServerInterceptor returns a [connect.ServerInterceptor] that rate
// limits every call of the servers it is given to, and the
// [limiter.Limiter] that keeps the accounts: call its Close when done, to
// flush settlements still waiting for the store; read its Stats; pass it to
// [RegisterQuotaService], or to the connect-go v1 adapter to limit v1
// handlers with the same accounts.
//
// The interceptor charges calls in store according to costs. Both are
// required. Concurrency limits need a store that also implements
// [bucket.LeaseStore]. Unless the store is in-process ([bucket.InProcess],
// such as memstore), the default [FailLocal] policy needs a local store:
// pass [WithLocalStore]. It fails only for an invalid argument or option,
// naming it.
//
// For every call to a limited procedure it works out who is calling (see
// [WithIdentityFunc]) and the caller's tier, takes a concurrency slot if
// the procedure has one, and reserves the call's cost in every bucket the
// procedure draws from, all or nothing. A call that cannot be paid for is
// denied with [connect.CodeResourceExhausted] and google.rpc.RetryInfo and
// QuotaFailure details, and never reaches its handler. connect-go v2 errors
// carry no metadata, so the RateLimit, RateLimit-Policy, Retry-After and
// Connectlimit-Warning fields go in the call's response headers
// ([connect.CallInfo.ResponseHeader]), for every protocol, or in its
// trailers for a stream cut off after its headers went out. Costs are
// settled to what the call really used when it ends, streams are charged
// as their messages flow, and store failures are handled by a failure
// policy: see [limiter.Limiter] for the rules.
//
// A unary call whose cost needs no request message (no estimate
// expression) is reserved before its request is read, so that a call that
// will be denied costs no decoding; it is then charged even if its request
// fails to decode, as any call whose handler fails keeps its fixed costs.
func NewServerInterceptor(store bucket.Store, costs *costmap.Map, opts ...Option) (connect.ServerInterceptor, *limiter.Limiter, error) {
	o := options{identify: defaultIdentity}
	for _, opt := range opts {
		opt.apply(&o)
	}
	if o.identify == nil {
		return nil, nil, errors.New("interceptor: WithIdentityFunc(nil)")
	}
	identify := o.identify
	lim, err := limiter.New(store, costs, append(o.limiter,
		limiter.WithIdentityFunc(func(ctx context.Context, call *limiter.CallInfo) (Identity, error) {
			info, ok := connect.CallInfoForServerContext(ctx)
			if !ok {
				// A connect-go v1 call, on a Limiter shared with v1
				// handlers: describe it as v2 would.
				info = v2CallInfo(call)
			}
			return identify(ctx, info)
		}),
		// The identity function's *connect.Error goes to the client as is.
		limiter.WithPassError(func(err error) bool {
			var ce *connect.Error
			return errors.As(err, &ce)
		}),
	)...)
	if err != nil {
		return nil, nil, err
	}
	return NewServerInterceptorFromLimiter(lim), lim, nil
}

// NewServerInterceptorFromLimiter returns a [connect.ServerInterceptor]
// that rate limits calls with an existing [limiter.Limiter], so that
// connect-go v1 and v2 handlers can share one: the server package's
// Server.Limiter, the Limiter of a v1 interceptor.Interceptor, or one built
// with [limiter.New]. The calls are identified by the Limiter's identity
// function, which receives a v2 call's request headers as an
// [net/http.Header]. The interceptor does not close the Limiter.
func NewServerInterceptorFromLimiter(lim *limiter.Limiter) connect.ServerInterceptor {
	return func(next connect.ServerFunc) connect.ServerFunc {
		return func(ctx context.Context, spec connect.Spec, stream connect.ServerStream) error {
			info, ok := connect.CallInfoForServerContext(ctx)
			if !ok {
				// Not a call that a connect.Server dispatched.
				return next(ctx, spec, stream)
			}
			call, err := lim.Start(ctx, callInfo(spec, info))
			if err != nil {
				return refuse(info, err)
			}
			if call == nil {
				return next(ctx, spec, stream)
			}
			if spec.StreamType == connect.StreamTypeUnary {
				return serveUnary(ctx, lim, call, spec, info, stream, next)
			}
			return serveStream(ctx, call, spec, info, stream, next)
		}
	}
}

// ReportUsage records, from inside a handler, that the current call used
// tokens from a bucket its procedure charges; see [limiter.ReportUsage].
func ReportUsage(ctx context.Context, bucketName string, tokens float64) error {
	return limiter.ReportUsage(ctx, bucketName, tokens)
}

// serveUnary runs a unary call. The handler's response is held until the
// call is settled, so that its headers show the buckets after the call's
// actual cost.
func serveUnary(ctx context.Context, lim *limiter.Limiter, call *limiter.Call, spec connect.Spec,
	info *connect.CallInfo, stream connect.ServerStream, next connect.ServerFunc,
) error {
	// A handler that panics still ends the call: its slot is released and
	// its reservation kept.
	defer call.End(ctx, true)
	u := &unaryStream{ServerStream: stream, ctx: ctx, call: call, info: info}
	if call.ReservesOnStart() {
		if err := call.Reserve(ctx, nil); err != nil {
			return refuse(info, err)
		}
	} else {
		u.pricing = true
	}
	err := next(call.Context(ctx), spec, u)
	if u.refusal != nil {
		return u.refusal // settled to nothing, its fields in the headers
	}
	if err == nil && u.res != nil {
		_ = call.Sent(ctx, message(u.res)) // a unary call settles when it ends
	}
	d := call.End(ctx, err != nil)
	setFields(info.ResponseHeader(), lim.HeaderFields(d))
	if err != nil || u.res == nil {
		return err
	}
	return stream.Send(u.res)
}

// unaryStream reserves a unary call's estimated cost on its request and
// holds its response. A unary handler receives and sends one message each,
// in one goroutine.
type unaryStream struct {
	connect.ServerStream
	ctx  context.Context //nolint:containedctx // the call's, for the reservation
	call *limiter.Call
	info *connect.CallInfo

	pricing bool  // the request prices the reservation
	refusal error // why the reservation refused the call
	res     any   // the response, sent once the call is settled
}

// Receive implements [connect.ServerStream]: the request reserves the
// call's cost when it is priced on it.
func (u *unaryStream) Receive(m any) error {
	if err := u.ServerStream.Receive(m); err != nil {
		return err
	}
	if u.pricing {
		u.pricing = false
		if err := u.call.Reserve(u.ctx, message(m)); err != nil {
			u.refusal = refuse(u.info, err)
			return u.refusal
		}
	}
	return nil
}

// Send implements [connect.ServerStream]: it holds the response until the
// call is settled.
func (u *unaryStream) Send(m any) error {
	if u.res != nil {
		return connect.NewError(connect.CodeInternal, "unary handler sent more than one response")
	}
	u.res = m
	return nil
}

// serveStream runs a streaming call with its accounting.
func serveStream(ctx context.Context, call *limiter.Call, spec connect.Spec,
	info *connect.CallInfo, stream connect.ServerStream, next connect.ServerFunc,
) error {
	header := info.ResponseHeader()
	limited, ctx := limiter.NewStream(ctx, call, func(name, value string) {
		if value == "" {
			header.Delete(name)
		} else {
			header.Set(name, value)
		}
	})
	// A handler that panics still ends the call: its slot is released and
	// its reservation kept.
	defer call.End(ctx, true)
	if err := limited.Start(); err != nil {
		return toConnect(err) // its fields are in the headers
	}
	s := &serverStream{ServerStream: stream, limited: limited}
	err := next(ctx, spec, s)
	if cut := limited.Finish(err); cut != nil {
		if s.flushed.Load() {
			// The headers went out: the fields travel in trailers.
			setMeta(info.ResponseTrailer(), cut.Meta)
		}
		return toConnect(cut)
	}
	return err
}

// serverStream charges a streaming call as its messages flow, through the
// limiter's [limiter.Stream], which keeps what Receive and Send share. It
// overrides only Receive, Send and SendHeaders.
type serverStream struct {
	connect.ServerStream
	limited *limiter.Stream
	// flushed says that the response headers were sent.
	flushed atomic.Bool
}

// Receive implements [connect.ServerStream]. A server stream with an
// estimate reserves on its request message; client and bidi streams charge
// every message.
func (s *serverStream) Receive(m any) error {
	if err := s.limited.Err(); err != nil {
		return toConnect(err)
	}
	if err := s.ServerStream.Receive(m); err != nil {
		return err
	}
	if err := s.limited.Received(message(m)); err != nil {
		return toConnect(err)
	}
	return nil
}

// Send implements [connect.ServerStream]. The message is sent first: its
// tokens are spent. Then its usage is counted, and usage beyond the
// reservation is charged; if that fails, this was the stream's last
// message.
func (s *serverStream) Send(m any) error {
	err := s.limited.Send(message(m), func() error {
		s.flushed.Store(true)
		return s.ServerStream.Send(m)
	})
	return connectError(err)
}

// SendHeaders implements [connect.ServerStream]: once the headers are
// flushed, the limiter no longer writes them.
func (s *serverStream) SendHeaders() error {
	if err := s.limited.Err(); err != nil {
		return toConnect(err)
	}
	s.limited.MarkHeadersSent()
	s.flushed.Store(true)
	return s.ServerStream.SendHeaders()
}

// callInfo describes a call to the limiter. The request headers are handed
// over as an [http.Header] (sharing the values), so that the identity
// function of a Limiter built by the connect-go v1 adapter reads them too.
func callInfo(spec connect.Spec, info *connect.CallInfo) *limiter.CallInfo {
	header := make(http.Header, info.RequestHeader().Len())
	for name, values := range info.RequestHeader().All() {
		header[name] = values
	}
	ci := &limiter.CallInfo{
		Procedure:  spec.Procedure,
		StreamType: limiter.StreamType(spec.StreamType),
		PeerAddr:   info.PeerAddr,
		Protocol:   info.Protocol,
		Header:     header,
	}
	ci.Method, _ = spec.Schema.(protoreflect.MethodDescriptor)
	return ci
}

// v2CallInfo describes a call of another major (a connect-go v1 call on a
// shared Limiter) as a connect-go v2 CallInfo, for the identity function.
func v2CallInfo(call *limiter.CallInfo) *connect.CallInfo {
	info := &connect.CallInfo{
		Spec:     connect.Spec{Procedure: call.Procedure, StreamType: connect.StreamType(call.StreamType), Schema: call.Method},
		PeerAddr: call.PeerAddr,
		Protocol: call.Protocol,
	}
	if h, ok := call.Header.(http.Header); ok {
		for name, values := range h {
			info.RequestHeader().SetValues(name, values)
		}
	}
	return info
}
