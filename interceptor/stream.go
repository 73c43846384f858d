package interceptor

import (
	"context"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/limiter"
)

// stream charges a streaming call as its messages flow, through the
// limiter's [limiter.Stream], which keeps what Receive and Send share. It
// overrides only Receive and Send.
type stream struct {
	connect.StreamingHandlerConn
	limited *limiter.Stream
}

// Receive implements [connect.StreamingHandlerConn]. A server stream with an
// estimate reserves on its request message; client and bidi streams charge
// every message.
func (s *stream) Receive(m any) error {
	if err := s.limited.Err(); err != nil {
		return toConnect(err)
	}
	if err := s.StreamingHandlerConn.Receive(m); err != nil {
		return err
	}
	if err := s.limited.Received(message(m)); err != nil {
		return toConnect(err)
	}
	return nil
}

// Send implements [connect.StreamingHandlerConn]. The message is sent first:
// its tokens are spent. Then its usage is counted, and usage beyond the
// reservation is charged; if that fails, this was the stream's last message.
func (s *stream) Send(m any) error {
	err := s.limited.Send(message(m), func() error { return s.StreamingHandlerConn.Send(m) })
	return connectError(err)
}

// handleStream runs next on conn with the call's accounting.
func (i *Interceptor) handleStream(ctx context.Context, call *limiter.Call, conn connect.StreamingHandlerConn, next connect.StreamingHandlerFunc) error {
	header := conn.ResponseHeader()
	limited, ctx := limiter.NewStream(ctx, call, func(name, value string) {
		if value == "" {
			header.Del(name)
		} else {
			header.Set(name, value)
		}
	})
	// A handler that panics still ends the call: its slot is released and
	// its reservation kept.
	defer call.End(ctx, true)
	if err := limited.Start(); err != nil {
		return toConnect(err)
	}
	err := next(ctx, &stream{StreamingHandlerConn: conn, limited: limited})
	if cut := limited.Finish(err); cut != nil {
		return toConnect(cut)
	}
	return err
}
