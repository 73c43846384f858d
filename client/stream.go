package client

import (
	"context"
	"errors"
	"io"
	"net/http"
	"slices"
	"sync"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/client/quota"
)

// clientStream paces, observes and, for a server stream denied before its
// first message, retries a streaming call.
//
// Connect lets the write side (Send, RequestHeader, CloseRequest) and the
// read side (Receive, ResponseHeader, ResponseTrailer, CloseResponse) run
// in two goroutines at once, so what they share is guarded by mu: the
// current connection, which a retry replaces, and the pacing reservation.
// A retry happens only in Receive, once the request is closed, so the write
// side is done by then.
type clientStream struct {
	ctx  context.Context
	i    *Interceptor
	spec connect.Spec
	next connect.StreamingClientFunc

	// Write side only.
	sent bool

	// Read side only.
	received bool // a message arrived: no more retries

	mu       sync.Mutex
	conn     connect.StreamingClientConn
	c        *quota.Call // set by the first Send
	reserved []Cost
	// first is a server stream's request, kept to send it again; closed
	// reports that its request side was closed, so it can be retried.
	first  any
	closed bool
}

var _ connect.StreamingClientConn = (*clientStream)(nil)

func newClientStream(ctx context.Context, i *Interceptor, spec connect.Spec, next connect.StreamingClientFunc) *clientStream {
	return &clientStream{ctx: ctx, i: i, spec: spec, next: next, conn: next(ctx, spec)}
}

func (s *clientStream) current() connect.StreamingClientConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
}

// Spec implements [connect.StreamingClientConn].
func (s *clientStream) Spec() connect.Spec { return s.spec }

// Peer implements [connect.StreamingClientConn].
func (s *clientStream) Peer() connect.Peer { return s.current().Peer() }

// RequestHeader implements [connect.StreamingClientConn].
func (s *clientStream) RequestHeader() http.Header { return s.current().RequestHeader() }

// Send implements [connect.StreamingClientConn]. The first message is
// paced, and a server stream's is kept for a retry.
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
		if s.spec.StreamType == connect.StreamTypeServer {
			s.first = m
		}
		s.mu.Unlock()
	}
	return s.current().Send(m)
}

// CloseRequest implements [connect.StreamingClientConn].
func (s *clientStream) CloseRequest() error {
	s.mu.Lock()
	s.closed = true
	conn := s.conn
	s.mu.Unlock()
	return conn.CloseRequest()
}

// Receive implements [connect.StreamingClientConn]. The first message's
// headers update the quota state, as does the error that ends the stream;
// a server stream denied before its first message with a RetryInfo is
// sent again after the wait.
func (s *clientStream) Receive(m any) error {
	for {
		conn := s.current()
		err := conn.Receive(m)
		if err == nil {
			if !s.received {
				s.received = true
				s.i.tracker.Observe(conn.ResponseHeader(), s.takeReserved())
			}
			return nil
		}
		meta := errorMeta(err)
		if s.received {
			if meta != nil { // a stream cut off: its state is in trailers
				s.i.tracker.Observe(meta, nil)
			}
			return err
		}
		if meta == nil {
			meta = conn.ResponseHeader()
		}
		s.i.tracker.Observe(meta, s.takeReserved())
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

// retryable returns the call and request of a server stream whose request
// side is closed, which Receive may send again; nil otherwise.
func (s *clientStream) retryable() (*quota.Call, any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.spec.StreamType != connect.StreamTypeServer || !s.closed || s.first == nil {
		return nil, nil
	}
	return s.c, s.first
}

// resend replaces the denied connection old with a new one carrying the
// same request headers and message.
func (s *clientStream) resend(old connect.StreamingClientConn, msg any) error {
	_ = old.CloseResponse()
	conn := s.next(s.ctx, s.spec)
	header := conn.RequestHeader()
	for k, v := range old.RequestHeader() {
		// The new connection's own protocol headers (a timeout computed
		// from the context's deadline, say) are newer: keep them.
		if _, ok := header[k]; !ok {
			header[k] = slices.Clone(v)
		}
	}
	s.mu.Lock()
	s.conn = conn
	s.mu.Unlock()
	// Send returns io.EOF when the server has already answered; Receive
	// then returns what it said.
	if err := conn.Send(msg); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return conn.CloseRequest()
}

// takeReserved returns the pacing reservation, once.
func (s *clientStream) takeReserved() []Cost {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.reserved
	s.reserved = nil
	return r
}

// ResponseHeader implements [connect.StreamingClientConn].
func (s *clientStream) ResponseHeader() http.Header { return s.current().ResponseHeader() }

// ResponseTrailer implements [connect.StreamingClientConn].
func (s *clientStream) ResponseTrailer() http.Header { return s.current().ResponseTrailer() }

// CloseResponse implements [connect.StreamingClientConn]. A stream closed
// before its first message no longer counts toward pacing.
func (s *clientStream) CloseResponse() error {
	s.i.tracker.Release(s.takeReserved())
	return s.current().CloseResponse()
}
