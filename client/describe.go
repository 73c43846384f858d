package client

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
)

// Limit describes a call denied for a rate or concurrency limit, for user
// interfaces and logs (see [Describe]).
type Limit struct {
	// Bucket names the bucket or concurrency limit that denied the call
	// (the google.rpc.QuotaFailure violation's quota_id; when several
	// buckets could not pay, the one the message names, which a
	// connectlimit server picks as the one with the longest wait); empty
	// if the error has no QuotaFailure.
	Bucket string
	// Subject is who was limited, as the server identified the caller:
	// "key:<name>", "user:<id>" or "ip:<address>" on a connectlimit
	// server; empty if the error does not say.
	Subject string
	// RetryAfter is how long until the call can be allowed: the
	// google.rpc.RetryInfo delay, or the Retry-After header's whole
	// seconds when there is no RetryInfo. It is zero when the error says
	// neither, which a connectlimit server means as "no wait helps" (a call
	// that costs more than its bucket holds, or a concurrency limit).
	RetryAfter time.Duration
	// Message is the error's message, e.g. `connectlimit: rate limit
	// exceeded for bucket "search": retry in 742ms`.
	Message string
}

// Describe reports whether err (or an error it wraps) is a
// [connect.CodeResourceExhausted] error, and if so describes it from its
// details and metadata. It is safe for concurrent use.
func Describe(err error) (Limit, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
		return Limit{}, false
	}
	l := Limit{Message: ce.Message()}
	retry, hasRetry := retryInfo(ce)
	var violations []*errdetails.QuotaFailure_Violation
	for _, d := range ce.Details() {
		if qf, ok := detailValue[*errdetails.QuotaFailure](d); ok {
			violations = append(violations, qf.GetViolations()...)
		}
	}
	if len(violations) > 0 {
		pick := violations[0]
		for _, v := range violations {
			// The message names the worst bucket, quoted.
			if strings.Contains(l.Message, strconv.Quote(v.GetQuotaId())) {
				pick = v
				break
			}
		}
		l.Bucket, l.Subject = pick.GetQuotaId(), pick.GetSubject()
	}
	l.RetryAfter = retry
	if !hasRetry {
		l.RetryAfter = retryAfterHeader(ce.Meta())
	}
	return l, true
}

// retryDelay returns the google.rpc.RetryInfo delay of a
// [connect.CodeResourceExhausted] error: the only denials worth retrying.
func retryDelay(err error) (time.Duration, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
		return 0, false
	}
	return retryInfo(ce)
}

// retryInfo returns the delay of ce's first valid RetryInfo detail.
func retryInfo(ce *connect.Error) (time.Duration, bool) {
	for _, d := range ce.Details() {
		ri, ok := detailValue[*errdetails.RetryInfo](d)
		if !ok || ri.GetRetryDelay().CheckValid() != nil {
			continue
		}
		if delay := ri.GetRetryDelay().AsDuration(); delay >= 0 {
			return delay, true
		}
	}
	return 0, false
}

// detailValue returns d's message if it is a T.
func detailValue[T any](d *connect.ErrorDetail) (T, bool) {
	var zero T
	v, err := d.Value()
	if err != nil {
		return zero, false
	}
	t, ok := v.(T)
	return t, ok
}

// retryAfterHeader reads Retry-After's delay-seconds; zero if it is absent
// or not a number of seconds.
func retryAfterHeader(h http.Header) time.Duration {
	n, err := strconv.ParseInt(strings.TrimSpace(h.Get(HeaderRetryAfter)), 10, 64)
	if err != nil || n < 0 {
		return 0
	}
	return seconds(n)
}

// errorMeta returns the metadata of a Connect error: for a client, the
// union of the response's headers and trailers. It is nil for other
// errors.
func errorMeta(err error) http.Header {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return nil
	}
	return ce.Meta()
}
