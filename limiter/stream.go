package limiter

import (
	"context"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/bucket"
)

// Field is a response header field, as [Limiter.HeaderFields] and
// [Error.Meta] give them. An empty Value means the field must be removed.
type Field struct {
	Name, Value string
}

// HeaderFields returns the RateLimit fields of a decision and the warning
// field (with an empty value, to remove a stale one, when no bucket is
// low). A nil decision gives none.
func (l *Limiter) HeaderFields(d *bucket.Decision) []Field {
	if d == nil {
		return nil
	}
	f := &fieldList{}
	l.setHeaders(f, d)
	return f.fields
}

// fieldList collects header fields in the order they are first set (the
// RateLimit-Policy, RateLimit and warning fields); a deleted one keeps its
// place, with an empty value. Its room for those three is part of it, so
// that collecting them costs one allocation.
type fieldList struct {
	room   [3]Field
	fields []Field
}

func (f *fieldList) Set(name, value string) {
	for i := range f.fields {
		if f.fields[i].Name == name {
			f.fields[i].Value = value
			return
		}
	}
	if f.fields == nil {
		f.fields = f.room[:0]
	}
	f.fields = append(f.fields, Field{Name: name, Value: value})
}

func (f *fieldList) Del(name string) { f.Set(name, "") }

// Stream is the state a limited stream's Receive and Send share, for the
// adapters' stream wrappers. Connect lets Receive and Send run in two
// goroutines at once, so it is guarded by a mutex: the error that cut the
// stream, and the response headers, which are written only until the first
// message is sent (they go out with it). After that, the state of the
// buckets reaches the client only in the error that ends the stream, which
// protocols send as trailers.
type Stream struct {
	call      *Call
	ctx       context.Context
	cancel    context.CancelCauseFunc
	setHeader func(name, value string)

	mu sync.Mutex
	// err is a denial or cut decided here. Once set, Send and Receive
	// return it, and it replaces whatever the handler returns.
	err         *Error
	headersSent bool
}

// NewStream returns the Stream of call and the context its handler runs
// with: it carries the call (for [ReportUsage]) and is canceled when the
// limiter cuts the stream, so that a model stops generating. setHeader
// sets a response header field, or removes it when value is empty; it is
// called only before the first message is sent, under the Stream's lock.
func NewStream(ctx context.Context, call *Call, setHeader func(name, value string)) (*Stream, context.Context) {
	ctx, cancel := context.WithCancelCause(call.Context(ctx))
	return &Stream{call: call, ctx: ctx, cancel: cancel, setHeader: setHeader}, ctx
}

// Start reserves the call's cost before the handler runs, when it needs no
// request message (see [Call.ReservesOnStart]), and writes the headers. It
// returns the *[Error] that refuses the stream.
func (s *Stream) Start() *Error {
	if !s.call.ReservesOnStart() {
		return nil
	}
	return s.reserved(s.call.Reserve(s.ctx, nil))
}

// Err returns the error that cut the stream, or nil. Receive and Send
// wrappers return it, without calling the underlying stream, once it is
// set.
func (s *Stream) Err() *Error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Received records a message the underlying Receive returned and returns
// the *[Error] that ends the stream, if any.
func (s *Stream) Received(msg proto.Message) *Error {
	first := !s.call.perMessage && s.call.rule.Estimated()
	err := s.call.Received(s.ctx, msg)
	if first {
		return s.reserved(err)
	}
	if err != nil {
		return s.fail(err)
	}
	s.writeHeaders(s.call.Decision())
	return nil
}

// reserved records the outcome of a reservation.
func (s *Stream) reserved(err error) *Error {
	if err != nil {
		e := asError(err)
		s.mu.Lock()
		if !s.headersSent {
			s.writeMetaLocked(e)
		}
		s.err = e
		s.mu.Unlock()
		return e
	}
	s.writeHeaders(s.call.Decision())
	return nil
}

// Send sends msg with send (the underlying Send), then records it: its
// usage is counted, and usage beyond the reservation is charged. The
// message is sent first: its tokens are spent. It returns send's error, or
// the *[Error] that ends the stream after this message. The first message
// is sent holding the lock, since it flushes the response headers: a
// concurrent Receive cannot write them meanwhile.
func (s *Stream) Send(msg proto.Message, send func() error) error {
	if err := s.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	if s.headersSent {
		s.mu.Unlock()
		if err := send(); err != nil {
			return err
		}
	} else {
		s.headersSent = true
		err := send()
		s.mu.Unlock()
		if err != nil {
			return err
		}
	}
	if err := s.call.Sent(s.ctx, msg); err != nil {
		return s.fail(err)
	}
	return nil
}

// MarkHeadersSent records that the response headers went out without a
// message (an explicit flush), so that they are no longer written.
func (s *Stream) MarkHeadersSent() {
	s.mu.Lock()
	s.headersSent = true
	s.mu.Unlock()
}

// writeHeaders writes d's fields into the response headers, unless they
// have been sent.
func (s *Stream) writeHeaders(d *bucket.Decision) {
	fields := s.call.ic.HeaderFields(d)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.headersSent {
		return
	}
	for _, f := range fields {
		s.setHeader(f.Name, f.Value)
	}
}

// writeMetaLocked copies an error's metadata into the response headers: on a
// stream, error metadata travels as trailers in some protocols, and the
// RateLimit fields belong in headers.
func (s *Stream) writeMetaLocked(e *Error) {
	for name, values := range e.Meta {
		if len(values) > 0 {
			s.setHeader(name, values[0])
		}
	}
}

// fail ends the stream with err: the handler's context is canceled so that
// its model stops generating.
func (s *Stream) fail(err error) *Error {
	e := asError(err)
	s.mu.Lock()
	if s.err == nil {
		s.err = e
	}
	e = s.err
	s.mu.Unlock()
	s.cancel(e)
	return e
}

// Finish settles the stream once its handler returned handlerErr, and
// returns the *[Error] that cut it, if any, which replaces handlerErr. The
// handler has returned, so nothing else touches the stream.
func (s *Stream) Finish(handlerErr error) *Error {
	d := s.call.End(s.ctx, handlerErr != nil && s.err == nil)
	defer s.cancel(nil)
	if s.err != nil {
		if !s.headersSent {
			s.writeMetaLocked(s.err)
		}
		return s.err
	}
	if !s.headersSent {
		// Nothing was sent: the settled state can still go in headers.
		for _, f := range s.call.ic.HeaderFields(d) {
			s.setHeader(f.Name, f.Value)
		}
	}
	return nil
}

// asError returns err as an *Error: the call's errors always are.
func asError(err error) *Error {
	if e, ok := err.(*Error); ok { //nolint:errorlint // the call returns *Error itself
		return e
	}
	return internalError("unexpected error")
}
