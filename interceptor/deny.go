package interceptor

import (
	"errors"
	"net/http"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/limiter"
)

// Header names set by the interceptor. RateLimit-Policy and RateLimit follow
// draft-ietf-httpapi-ratelimit-headers-10.
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

// DenialError returns the error an [Interceptor] sends for a denied
// decision: [connect.CodeResourceExhausted] (HTTP 429) with a message naming
// the bucket and the wait, a google.rpc.RetryInfo detail with the exact time
// until the call is affordable, a google.rpc.QuotaFailure detail with one
// violation per bucket that could not pay (subject and bucket), and the
// Retry-After, RateLimit-Policy and RateLimit headers in its metadata.
//
// When the cost exceeds a bucket's capacity, no wait helps: the message says
// so and there is neither RetryInfo nor Retry-After. It is exported for
// handlers and tests that want to produce the same denial.
func DenialError(subject string, d bucket.Decision) *connect.Error {
	return toConnect(limiter.Denial(subject, d))
}

// toConnect returns the connect-go v1 error for a limiter error: the same
// code, message, details and metadata.
func toConnect(e *limiter.Error) *connect.Error {
	ce := connect.NewError(connect.Code(e.Code), errors.New(e.Message))
	for _, d := range e.Details {
		if detail, err := connect.NewErrorDetail(d); err == nil {
			ce.AddDetail(detail)
		}
	}
	for name, values := range e.Meta {
		ce.Meta()[name] = append([]string(nil), values...)
	}
	return ce
}

// connectError returns err as a connect-go v1 error when it is a limiter
// error, and as is otherwise (a context error, or the identity function's
// own *connect.Error).
func connectError(err error) error {
	var e *limiter.Error
	if errors.As(err, &e) {
		return toConnect(e)
	}
	return err
}

// setFields writes limiter header fields into h. The values share one
// array, each slice capped at its one value, so that a later append to a
// field copies it rather than overwrite the next: one allocation for all
// of a call's fields.
func setFields(h http.Header, fields []limiter.Field) {
	values := make([]string, len(fields))
	for i, f := range fields {
		// As h.Set and h.Del do, but with the canonical name computed
		// once: "RateLimit-Policy" is not canonical, and canonicalising it
		// makes a new string on every call.
		name, ok := canonicalNames[f.Name]
		if !ok {
			name = http.CanonicalHeaderKey(f.Name)
		}
		if f.Value == "" {
			delete(h, name)
		} else {
			values[i] = f.Value
			h[name] = values[i : i+1 : i+1]
		}
	}
}

// canonicalNames maps the name of every header field the limiter sets to
// its canonical form.
var canonicalNames = func() map[string]string {
	m := make(map[string]string)
	for _, name := range limiter.HeaderNames() {
		m[name] = http.CanonicalHeaderKey(name)
	}
	return m
}()

// message returns msg as a proto.Message, or nil.
func message(msg any) proto.Message {
	m, _ := msg.(proto.Message)
	return m
}
