package interceptor

import (
	"errors"
	"net/http"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connectproto"
	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/limiter"
)

// Header names set by the interceptor, in response headers (or, for a
// stream cut off after its headers went out, trailers). RateLimit-Policy
// and RateLimit follow draft-ietf-httpapi-ratelimit-headers-10.
const (
	// HeaderRetryAfter is set on denials that a wait can cure: whole
	// seconds, rounded up.
	HeaderRetryAfter = limiter.HeaderRetryAfter
	// HeaderRateLimitPolicy lists each bucket a call drew from as
	// `"name";q=<capacity>;w=<seconds to refill from empty>`.
	HeaderRateLimitPolicy = limiter.HeaderRateLimitPolicy
	// HeaderRateLimit lists each bucket's state after the call as
	// `"name";r=<whole tokens remaining>;t=<seconds until full>`.
	HeaderRateLimit = limiter.HeaderRateLimit
	// HeaderWarning lists, on an allowed call, the buckets left below the
	// warning fraction of their capacity (see [WithWarnFraction]), as
	// `"name";r=<whole tokens remaining>;q=<capacity>`. It is absent when
	// no bucket is low.
	HeaderWarning = limiter.HeaderWarning
)

// HeaderNames returns the names of every response header the interceptor
// may set, for servers that list them in CORS's Access-Control-Expose-Headers
// so that browser code on another origin can read them.
func HeaderNames() []string { return limiter.HeaderNames() }

// toConnect returns the connect-go v2 error for a limiter error: the same
// code, message and details. Its metadata has no place in a v2 error: the
// callers write it into the call's headers or trailers.
func toConnect(e *limiter.Error) *connect.Error {
	ce := connect.NewError(connect.Code(e.Code), e.Message)
	if cause := errors.Unwrap(e); cause != nil {
		ce = ce.WithCause(cause)
	}
	for _, d := range e.Details {
		if detail, err := connectproto.NewErrorDetail(d); err == nil {
			ce = ce.WithDetail(detail)
		}
	}
	return ce
}

// connectError returns err as a connect-go v2 error when it is a limiter
// error, and as is otherwise.
func connectError(err error) error {
	var e *limiter.Error
	if errors.As(err, &e) {
		return toConnect(e)
	}
	return err
}

// refuse returns the error for a call the limiter refused before its
// handler ran, with the error's fields in the response headers. Errors that
// are not the limiter's (the identity function's own *connect.Error) are
// returned as they are.
func refuse(info *connect.CallInfo, err error) error {
	var e *limiter.Error
	if !errors.As(err, &e) {
		return err
	}
	setMeta(info.ResponseHeader(), e.Meta)
	return toConnect(e)
}

// setMeta writes a limiter error's metadata into h.
func setMeta(h *connect.Header, meta http.Header) {
	for name, values := range meta {
		if len(values) > 0 {
			h.SetValues(name, append([]string(nil), values...))
		}
	}
}

// setFields writes limiter header fields into h.
func setFields(h *connect.Header, fields []limiter.Field) {
	for _, f := range fields {
		if f.Value == "" {
			h.Delete(f.Name)
		} else {
			h.Set(f.Name, f.Value)
		}
	}
}

// message returns msg as a proto.Message, or nil.
func message(msg any) proto.Message {
	m, _ := msg.(proto.Message)
	return m
}
