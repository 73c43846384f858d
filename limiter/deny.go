package limiter

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/connectlimit/connectlimit/bucket"
)

// Header names set by the limiter. RateLimit-Policy and RateLimit follow
// draft-ietf-httpapi-ratelimit-headers-10.
const (
	// HeaderRetryAfter is set on denials that a wait can cure: whole
	// seconds, rounded up.
	HeaderRetryAfter = "Retry-After"
	// HeaderRateLimitPolicy lists each bucket a call drew from as
	// `"name";q=<capacity>;w=<seconds to refill from empty>`.
	HeaderRateLimitPolicy = "RateLimit-Policy"
	// HeaderRateLimit lists each bucket's state after the call as
	// `"name";r=<whole tokens remaining>;t=<seconds until full>`.
	HeaderRateLimit = "RateLimit"
	// HeaderWarning lists, on an allowed call, the buckets left below the
	// warning fraction of their capacity (see [WithWarnFraction]), as
	// `"name";r=<whole tokens remaining>;q=<capacity>`, so clients can slow
	// down before they are denied. It is absent when no bucket is low.
	HeaderWarning = "Connectlimit-Warning"
)

// HeaderNames returns the names of every response header the limiter may
// set, for servers that list them in CORS's Access-Control-Expose-Headers
// so that browser code on another origin can read them.
func HeaderNames() []string {
	return []string{HeaderRateLimit, HeaderRateLimitPolicy, HeaderRetryAfter, HeaderWarning}
}

// Error is how the limiter refuses a call, in terms that each connect-go
// major turns into its own error: a status code, a message, error details
// (google.rpc.RetryInfo and QuotaFailure) and metadata (the Retry-After and
// RateLimit fields). The adapters (the interceptor packages) send it to
// clients as a Connect error with the same code, message, details and
// metadata.
type Error struct {
	// Code is the status code, as in google.rpc.Code and Connect.
	Code code.Code
	// Message is the error message for the client. It never carries a
	// backend's error text.
	Message string
	// Details are the error details, in order.
	Details []proto.Message
	// Meta is the error's metadata: header fields for the client.
	Meta http.Header
	// cause is what went wrong, for errors.Is and logs; never sent.
	cause error
}

// Error returns the code and the message, as Connect errors print.
func (e *Error) Error() string {
	return strings.ToLower(e.Code.String()) + ": " + e.Message
}

// Unwrap returns the cause, if any.
func (e *Error) Unwrap() error { return e.cause }

func newError(c code.Code, msg string) *Error {
	return &Error{Code: c, Message: msg, Meta: http.Header{}}
}

// unavailableError is what FailClosed answers: the limiter cannot decide,
// and a retry may succeed.
func unavailableError() *Error {
	return newError(code.Code_UNAVAILABLE, "connectlimit: rate limiter unavailable, retry later")
}

// internalError is a misconfiguration or an invalid request to the store:
// the details stay in the logs.
func internalError(msg string) *Error {
	return newError(code.Code_INTERNAL, "connectlimit: "+msg)
}

// contextError is the error for a call whose context ended.
func contextError(err error) *Error {
	c := code.Code_CANCELLED
	if errors.Is(err, context.DeadlineExceeded) {
		c = code.Code_DEADLINE_EXCEEDED
	}
	e := newError(c, err.Error())
	e.cause = err
	return e
}

// Denial returns the error the limiter sends for a denied decision:
// resource_exhausted (HTTP 429) with a message naming the bucket and the
// wait, a google.rpc.RetryInfo detail with the exact time until the call is
// affordable, a google.rpc.QuotaFailure detail with one violation per bucket
// that could not pay (subject and bucket), and the Retry-After,
// RateLimit-Policy and RateLimit fields in its metadata.
//
// When the cost exceeds a bucket's capacity, no wait helps: the message says
// so and there is neither RetryInfo nor Retry-After.
func Denial(subject string, d bucket.Decision) *Error {
	worst, _ := d.Denying()
	var msg string
	if worst.OverCapacity() {
		msg = fmt.Sprintf("connectlimit: a call costs %s tokens but bucket %q holds at most %s, so it can never be allowed",
			formatTokens(worst.Cost), worst.Bucket, formatTokens(worst.Limit.Capacity))
	} else {
		msg = fmt.Sprintf("connectlimit: rate limit exceeded for bucket %q: retry in %v",
			worst.Bucket, d.RetryAfter.Round(time.Millisecond))
	}
	err := newError(code.Code_RESOURCE_EXHAUSTED, msg)
	if !worst.OverCapacity() && d.RetryAfter > 0 {
		err.Details = append(err.Details, &errdetails.RetryInfo{RetryDelay: durationpb.New(d.RetryAfter)})
		err.Meta.Set(HeaderRetryAfter, strconv.FormatInt(ceilSeconds(d.RetryAfter), 10))
	}
	qf := &errdetails.QuotaFailure{}
	for _, b := range d.Buckets {
		if b.Allowed {
			continue
		}
		qf.Violations = append(qf.Violations, &errdetails.QuotaFailure_Violation{
			Subject: subject,
			Description: fmt.Sprintf("bucket %q: call costs %s tokens, %s available of %s, refilling %s per second",
				b.Bucket, formatTokens(b.Cost), formatTokens(math.Max(0, b.Remaining)),
				formatTokens(b.Limit.Capacity), formatTokens(b.Limit.RefillPerSecond)),
			QuotaId:    b.Bucket,
			QuotaValue: int64(b.Limit.Capacity),
		})
	}
	err.Details = append(err.Details, qf)
	setRateLimitFields(err.Meta, &d)
	return err
}

// concurrencyDenial is the error for a call refused by a concurrency limit.
// It has no RetryInfo: when a slot frees up depends on other calls.
func concurrencyDenial(subject, name string, d bucket.LeaseDecision) *Error {
	err := newError(code.Code_RESOURCE_EXHAUSTED,
		fmt.Sprintf("connectlimit: concurrency limit %q reached: %d of %d calls already in flight", name, d.InUse, d.Limit))
	err.Details = append(err.Details, &errdetails.QuotaFailure{Violations: []*errdetails.QuotaFailure_Violation{{
		Subject:     subject,
		Description: fmt.Sprintf("concurrency limit %q: at most %d calls at once", name, d.Limit),
		QuotaId:     name,
		QuotaValue:  int64(d.Limit),
	}}})
	return err
}

// headerSetter is where header fields are written: an http.Header, or a
// fieldList.
type headerSetter interface {
	Set(name, value string)
	Del(name string)
}

// setHeaders writes into h the RateLimit fields of a decision and, if some
// bucket is running low, the warning field (or deletes a stale one). A nil
// decision writes nothing.
func (l *Limiter) setHeaders(h headerSetter, d *bucket.Decision) {
	if d == nil {
		return
	}
	setRateLimitFields(h, d)
	if l.cfg.warnBelow <= 0 {
		return
	}
	// Made for the first low bucket: most calls have none, and fmt would
	// move a builder declared here to the heap on every call.
	var warn *strings.Builder
	for _, b := range d.Buckets {
		if b.Remaining >= l.cfg.warnBelow*b.Limit.Capacity {
			continue
		}
		if warn == nil {
			warn = new(strings.Builder)
		} else {
			warn.WriteString(", ")
		}
		fmt.Fprintf(warn, "%q;r=%d;q=%d", b.Bucket, int64(math.Max(0, b.Remaining)), int64(b.Limit.Capacity))
	}
	if warn != nil {
		h.Set(HeaderWarning, warn.String())
	} else {
		h.Del(HeaderWarning)
	}
}

// setRateLimitFields writes the RateLimit-Policy and RateLimit fields for
// every bucket of a decision.
func setRateLimitFields(h headerSetter, d *bucket.Decision) {
	// Appended on the stack rather than formatted with fmt, which boxes
	// every argument: every limited call writes these two fields.
	var pbuf, sbuf [256]byte
	policy, state := pbuf[:0], sbuf[:0]
	for i := range d.Buckets {
		b := &d.Buckets[i]
		if i > 0 {
			policy = append(policy, ", "...)
			state = append(state, ", "...)
		}
		window := int64(min(math.Ceil(b.Limit.Capacity/b.Limit.RefillPerSecond), math.MaxInt32))
		policy = strconv.AppendQuote(policy, b.Bucket)
		policy = strconv.AppendInt(append(policy, ";q="...), int64(b.Limit.Capacity), 10)
		policy = strconv.AppendInt(append(policy, ";w="...), window, 10)
		state = strconv.AppendQuote(state, b.Bucket)
		state = strconv.AppendInt(append(state, ";r="...), int64(math.Max(0, b.Remaining)), 10)
		state = strconv.AppendInt(append(state, ";t="...), ceilSeconds(b.ResetAfter), 10)
	}
	h.Set(HeaderRateLimitPolicy, string(policy))
	h.Set(HeaderRateLimit, string(state))
}

// ceilSeconds rounds d up to whole seconds.
func ceilSeconds(d time.Duration) int64 {
	s := int64(d / time.Second)
	if d%time.Second > 0 {
		s++
	}
	return s
}

// formatTokens prints a token count compactly: 3, 0.25, 1.5e+06.
func formatTokens(f float64) string {
	return strconv.FormatFloat(f, 'g', 6, 64)
}
