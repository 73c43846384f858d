// Package client is a [connect.ClientInterceptor] for Go clients built
// with connect-go v2 (connectrpc.com/connect/v2) of services limited by
// connectlimit: it keeps the state of the server's buckets from the
// RateLimit headers of every response, retries denials that carry a
// google.rpc.RetryInfo after the wait they ask for, can pace calls so that
// they are not sent while they would certainly be denied, and describes
// denials for user interfaces and logs with [Describe].
//
// It is the connect-go v2 twin of the root module's package client
// (connect-go v1): both are thin adapters of package quota, which holds the
// state, the pacing and the retry budget. Install one [Interceptor] per set
// of credentials: the server keeps buckets per caller, and so does the
// interceptor's state.
//
//	limits, err := client.NewClientInterceptor(client.WithCost(aiservicev1connect.AIServiceSearchProcedure, "search", 1))
//	ai := aiservicev1connect.NewAIServiceClient(connect.NewClient(
//		connecthttp.NewTransport(http.DefaultClient, url), limits.ClientInterceptor()))
package client

import (
	"context"
	"errors"
	"io"
	"sync"

	"connectrpc.com/connect/v2"

	"github.com/connectlimit/connectlimit/client/quota"
)

// Interceptor keeps what a client knows of a connectlimit server's limits
// and provides the [connect.ClientInterceptor] that applies it
// ([Interceptor.ClientInterceptor]). Create one with [NewClientInterceptor].
// It is safe for concurrent use.
//
// For every call it:
//
//   - paces the call, if its procedure has a declared cost (see [WithCost]),
//     before its first message is sent;
//   - records the buckets reported by the RateLimit, RateLimit-Policy and
//     Connectlimit-Warning fields of the call's response headers (and, for
//     a call that fails, of its trailers), for [Interceptor.Quota] and the
//     subscribers of [Interceptor.Subscribe];
//   - retries a unary call or a server stream denied before its first
//     message with a google.rpc.RetryInfo (see [WithRetry]).
type Interceptor struct {
	tracker *quota.Tracker
}

// NewClientInterceptor returns an Interceptor configured by opts. It fails
// only for an invalid option, naming it.
func NewClientInterceptor(opts ...Option) (*Interceptor, error) {
	var cfg config
	for _, o := range opts {
		o.apply(&cfg)
	}
	tracker, err := quota.NewTracker(cfg.quota...)
	if err != nil {
		return nil, err
	}
	return &Interceptor{tracker: tracker}, nil
}

// ClientInterceptor returns the [connect.ClientInterceptor] to pass to
// [connect.NewClient]. Every client built with it shares the Interceptor's
// state.
func (i *Interceptor) ClientInterceptor() connect.ClientInterceptor {
	return func(next connect.ClientFunc) connect.ClientFunc {
		return func(ctx context.Context, spec connect.Spec) (connect.ClientStream, error) {
			info, ok := connect.CallInfoForClientContext(ctx)
			if !ok {
				ctx, info = connect.NewClientContext(ctx)
			}
			conn, err := next(ctx, spec)
			if err != nil {
				return nil, err
			}
			return &clientStream{ctx: ctx, i: i, spec: spec, next: next, info: info, conn: conn}, nil
		}
	}
}

// Quota returns the last known state of the server's bucket named bucket,
// and false if no response has reported it yet.
func (i *Interceptor) Quota(bucket string) (Quota, bool) {
	return i.tracker.Quota(bucket)
}

// Quotas returns the last known state of every bucket that responses have
// reported, sorted by name.
func (i *Interceptor) Quotas() []Quota {
	return i.tracker.Quotas()
}

// Subscribe calls f with the new state of a bucket each time a response
// reports it, starting at once with every bucket known so far (in name
// order), until the returned function is called. Calls to f are made one
// at a time and in the order the state changed, on the goroutine of a call
// that read a response (so f should be quick: hand the value to a channel
// or a UI loop). f may make calls through the interceptor, and may
// unsubscribe: updates that arrive while f runs are delivered after it
// returns. After unsubscribe returns, f is not called again, except for a
// call already running. Unsubscribing twice is harmless.
func (i *Interceptor) Subscribe(f func(Quota)) (unsubscribe func()) {
	return i.tracker.Subscribe(f)
}

// clientStream paces, observes and, for a unary call or a server stream
// denied before its first message, retries a call.
//
// A stream allows one send-side operation (SendHeaders, Send, CloseSend)
// and one receive-side operation (Receive, Close) at a time, and the two
// sides may run in two goroutines at once, so what they share is guarded
// by mu: the current stream, which a retry replaces, the call and its
// pacing reservation. A retry happens only in Receive, once the send side
// is closed, so the send side is done by then.
type clientStream struct {
	ctx  context.Context //nolint:containedctx // the call's, for waits and retries
	i    *Interceptor
	spec connect.Spec
	next connect.ClientFunc
	info *connect.CallInfo

	// Send side only.
	sent bool

	// Receive side only.
	received bool // a message arrived: no more retries

	mu       sync.Mutex
	conn     connect.ClientStream
	c        *quota.Call // set by the first Send
	reserved []quota.Cost
	// first is the request of a unary call or a server stream, kept to
	// send it again; closed reports that the send side was closed, so the
	// call can be retried.
	first  any
	closed bool
}

var _ connect.ClientStream = (*clientStream)(nil)

func (s *clientStream) current() connect.ClientStream {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
}

// SendHeaders implements [connect.ClientStream].
func (s *clientStream) SendHeaders() error { return s.current().SendHeaders() }

// Send implements [connect.ClientStream]. The first message is paced, and
// kept for a retry if the call has only one.
func (s *clientStream) Send(m any) error {
	if !s.sent {
		s.sent = true
		c := s.i.tracker.NewCall(s.spec.Procedure, m)
		reserved, err := c.Pace(s.ctx)
		if err != nil {
			return contextError(err)
		}
		c.Attempt()
		s.mu.Lock()
		s.c, s.reserved = c, reserved
		if s.spec.StreamType&connect.StreamTypeClient == 0 {
			s.first = m
		}
		s.mu.Unlock()
	}
	return s.current().Send(m)
}

// CloseSend implements [connect.ClientStream].
func (s *clientStream) CloseSend() error {
	s.mu.Lock()
	s.closed = true
	conn := s.conn
	s.mu.Unlock()
	return conn.CloseSend()
}

// Receive implements [connect.ClientStream]. The first message's headers
// update the quota state, as do the headers and trailers of an error that
// ends the call before it; a unary call or a server stream denied before
// its first message with a RetryInfo is sent again after the wait.
func (s *clientStream) Receive(m any) error {
	for {
		conn := s.current()
		err := conn.Receive(m)
		if err == nil {
			if !s.received {
				s.received = true
				s.i.tracker.Observe(s.info.ResponseHeader(), s.takeReserved())
			}
			return nil
		}
		if s.received {
			if !errors.Is(err, io.EOF) { // a stream cut off: its state is in trailers
				s.i.tracker.Observe(s.info.ResponseTrailer(), nil)
			}
			return err
		}
		s.i.tracker.Observe(headerAndTrailer{s.info}, s.takeReserved())
		delay, ok := retryDelay(err)
		c, first := s.retryable()
		if !ok || c == nil {
			return err
		}
		again, waitErr := c.Retry(s.ctx, delay)
		if waitErr != nil {
			return contextError(waitErr)
		}
		if !again {
			return err
		}
		c.Attempt()
		if err := s.resend(conn, first); err != nil {
			return err
		}
	}
}

// retryable returns the call and request of a unary call or server stream
// whose send side is closed, which Receive may send again; nil otherwise.
func (s *clientStream) retryable() (*quota.Call, any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed || s.first == nil {
		return nil, nil
	}
	return s.c, s.first
}

// resend replaces the denied stream old with a new one carrying the same
// request headers (the call's CallInfo's) and message. The denied
// attempt's response headers and trailers are cleared, so that the
// CallInfo tells of the attempt that counts.
func (s *clientStream) resend(old connect.ClientStream, msg any) error {
	_ = old.Close()
	clearHeader(s.info.ResponseHeader())
	clearHeader(s.info.ResponseTrailer())
	conn, err := s.next(s.ctx, s.spec)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.conn = conn
	s.mu.Unlock()
	// Send returns io.EOF when the server has already answered; Receive
	// then returns what it said.
	if err := conn.Send(msg); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return conn.CloseSend()
}

// takeReserved returns the pacing reservation, once.
func (s *clientStream) takeReserved() []quota.Cost {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.reserved
	s.reserved = nil
	return r
}

// Close implements [connect.ClientStream]. A call closed before its first
// message no longer counts toward pacing.
func (s *clientStream) Close() error {
	s.i.tracker.Release(s.takeReserved())
	return s.current().Close()
}

// headerAndTrailer reads a call's response headers, then its trailers:
// where a failed call's fields are (connect-go v2 errors carry none).
type headerAndTrailer struct{ info *connect.CallInfo }

func (h headerAndTrailer) Values(key string) []string {
	header, trailer := h.info.ResponseHeader().Values(key), h.info.ResponseTrailer().Values(key)
	if len(trailer) == 0 {
		return header
	}
	return append(append([]string(nil), header...), trailer...)
}

func clearHeader(h *connect.Header) {
	for key := range h.All() {
		h.Delete(key)
	}
}

// contextError turns the error of a wait cut short by its context into the
// error Connect gives a call whose context ended.
func contextError(err error) error {
	code := connect.CodeCanceled
	if errors.Is(err, context.DeadlineExceeded) {
		code = connect.CodeDeadlineExceeded
	}
	return connect.NewError(code, err.Error()).WithCause(err)
}
