package interceptor

import (
	"context"
	"sync"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
)

// stream charges a streaming call as its messages flow. It overrides only
// Receive and Send.
//
// Connect lets Receive and Send run in two goroutines at once (see
// [connect.StreamingHandlerConn]), so what they share is guarded by mu:
// the error that cut the stream, and the response headers, which are
// written only until the first message is sent (they go out with it).
// After that, the state of the buckets reaches the client only in the error
// that ends the stream, which protocols send as trailers.
type stream struct {
	connect.StreamingHandlerConn
	acct     *account
	ctx      context.Context
	cancel   context.CancelCauseFunc
	received bool // touched by Receive only

	mu sync.Mutex
	// err is a denial or cut decided here. Once set, Send and Receive
	// return it, and it replaces whatever the handler returns.
	err         error
	headersSent bool
}

// Receive implements [connect.StreamingHandlerConn]. A server stream with an
// estimate reserves on its request message; client and bidi streams charge
// every message.
func (s *stream) Receive(m any) error {
	if err := s.failed(); err != nil {
		return err
	}
	if err := s.StreamingHandlerConn.Receive(m); err != nil {
		return err
	}
	msg, _ := m.(proto.Message)
	first := !s.received
	s.received = true
	switch {
	case s.acct.perMessage:
		if err := s.acct.chargeMessage(s.ctx, msg); err != nil {
			return s.fail(err)
		}
		s.setHeaders()
	case first && s.acct.rule.Estimated():
		return s.reserve(msg)
	}
	return nil
}

// Send implements [connect.StreamingHandlerConn]. The message is sent first:
// its tokens are spent. Then its usage is counted, and usage beyond the
// reservation is charged; if that fails, this was the stream's last message.
func (s *stream) Send(m any) error {
	if err := s.failed(); err != nil {
		return err
	}
	if err := s.send(m); err != nil {
		return err
	}
	if s.acct.perMessage {
		return nil
	}
	if msg, ok := m.(proto.Message); ok {
		s.acct.addActual(s.ctx, msg)
	}
	if err := s.acct.chargeExcess(s.ctx); err != nil {
		return s.fail(err)
	}
	return nil
}

// send sends m. The first message flushes the response headers, so it is
// sent holding mu: a concurrent Receive cannot write them meanwhile.
func (s *stream) send(m any) error {
	s.mu.Lock()
	if s.headersSent {
		s.mu.Unlock()
		return s.StreamingHandlerConn.Send(m)
	}
	defer s.mu.Unlock()
	s.headersSent = true
	return s.StreamingHandlerConn.Send(m)
}

// reserve reserves the call's cost and sets the response headers.
func (s *stream) reserve(msg proto.Message) error {
	if err := s.acct.reserve(s.ctx, msg); err != nil {
		s.mu.Lock()
		if !s.headersSent {
			copyMetaToHeader(s.StreamingHandlerConn, err)
		}
		s.err = err
		s.mu.Unlock()
		return err
	}
	s.setHeaders()
	return nil
}

// setHeaders writes the latest decision into the response headers, unless
// they have been sent.
func (s *stream) setHeaders() {
	d := s.acct.currentDecision()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.headersSent {
		s.acct.ic.setHeaders(s.ResponseHeader(), d)
	}
}

func (s *stream) failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// fail ends the stream with err: the handler's context is canceled so that
// its model stops generating.
func (s *stream) fail(err error) error {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	err = s.err
	s.mu.Unlock()
	s.cancel(err)
	return err
}

// finish settles the stream once the handler returned err, and returns the
// stream's result. The handler has returned, so nothing else touches the
// stream.
func (s *stream) finish(err error) error {
	end := endOK
	if err != nil && s.err == nil {
		end = endFailed
	}
	d := s.acct.settle(s.ctx, end)
	if s.err != nil {
		if !s.headersSent {
			copyMetaToHeader(s.StreamingHandlerConn, s.err)
		}
		return s.err
	}
	if !s.headersSent {
		// Nothing was sent: the settled state can still go in headers.
		s.acct.ic.setHeaders(s.ResponseHeader(), d)
	}
	return err
}
