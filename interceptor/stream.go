package interceptor

import (
	"context"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
)

// stream charges a streaming call as its messages flow. It overrides only
// Receive and Send.
type stream struct {
	connect.StreamingHandlerConn
	call     *call
	ctx      context.Context
	cancel   context.CancelCauseFunc
	received bool
	// err is a denial or cut decided here. Once set, Send and Receive
	// return it, and it replaces whatever the handler returns.
	err error
}

// Receive implements [connect.StreamingHandlerConn]. A server stream with an
// estimate reserves on its request message; client and bidi streams charge
// every message.
func (s *stream) Receive(m any) error {
	if s.err != nil {
		return s.err
	}
	if err := s.StreamingHandlerConn.Receive(m); err != nil {
		return err
	}
	msg, _ := m.(proto.Message)
	first := !s.received
	s.received = true
	switch {
	case s.call.perMessage():
		if err := s.call.chargeMessage(s.ctx, msg); err != nil {
			return s.fail(err)
		}
		s.call.ic.setHeaders(s.ResponseHeader(), s.call.currentDecision())
	case first && s.call.rule.Estimated():
		return s.reserve(msg)
	}
	return nil
}

// Send implements [connect.StreamingHandlerConn]. The message is sent first:
// its tokens are spent. Then its usage is counted, and usage beyond the
// reservation is charged; if that fails, this was the stream's last message.
func (s *stream) Send(m any) error {
	if s.err != nil {
		return s.err
	}
	if err := s.StreamingHandlerConn.Send(m); err != nil {
		return err
	}
	if s.call.perMessage() {
		return nil
	}
	if msg, ok := m.(proto.Message); ok {
		s.call.addActual(s.ctx, msg)
	}
	if err := s.call.chargeExcess(s.ctx); err != nil {
		return s.fail(err)
	}
	return nil
}

// reserve reserves the call's cost and sets the response headers.
func (s *stream) reserve(msg proto.Message) error {
	if err := s.call.reserve(s.ctx, msg); err != nil {
		copyMetaToHeader(s.StreamingHandlerConn, err)
		s.err = err
		return err
	}
	s.call.ic.setHeaders(s.ResponseHeader(), s.call.currentDecision())
	return nil
}

// fail ends the stream with err: the handler's context is canceled so
// that its model stops generating.
func (s *stream) fail(err error) error {
	s.err = err
	s.cancel(err)
	return err
}

// finish settles the stream once the handler returned err, and returns the
// stream's result.
func (s *stream) finish(err error) error {
	s.call.settle(s.ctx, err != nil && s.err == nil)
	if s.err != nil {
		return s.err
	}
	return err
}
