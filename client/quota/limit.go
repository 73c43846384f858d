package quota

import (
	"strconv"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
)

// Limit describes a call denied for a rate or concurrency limit, for user
// interfaces and logs (see [DescribeDenial]).
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

// DescribeDenial describes a resource_exhausted error from its message, its
// details, decoded (a google.rpc.QuotaFailure names the bucket and the
// subject, a google.rpc.RetryInfo the wait; others are ignored), and its
// header fields (Retry-After, read only when there is no RetryInfo; nil if
// none). The client packages' Describe functions call it with what their
// connect-go major's error holds.
func DescribeDenial(message string, details []proto.Message, meta Header) Limit {
	l := Limit{Message: message}
	var violations []*errdetails.QuotaFailure_Violation
	for _, d := range details {
		if qf, ok := d.(*errdetails.QuotaFailure); ok {
			violations = append(violations, qf.GetViolations()...)
		}
	}
	if len(violations) > 0 {
		pick := violations[0]
		for _, v := range violations {
			// The message names the worst bucket, quoted.
			if strings.Contains(message, strconv.Quote(v.GetQuotaId())) {
				pick = v
				break
			}
		}
		l.Bucket, l.Subject = pick.GetQuotaId(), pick.GetSubject()
	}
	retry, ok := RetryDelay(details)
	switch {
	case ok:
		l.RetryAfter = retry
	case meta != nil:
		l.RetryAfter = retryAfterHeader(meta)
	}
	return l
}

// RetryDelay returns the delay of the first valid google.rpc.RetryInfo
// among details, and false if there is none. The client packages retry a
// resource_exhausted error only when it has one: a connectlimit server
// sends none when no wait helps.
func RetryDelay(details []proto.Message) (time.Duration, bool) {
	for _, d := range details {
		ri, ok := d.(*errdetails.RetryInfo)
		if !ok || ri.GetRetryDelay().CheckValid() != nil {
			continue
		}
		if delay := ri.GetRetryDelay().AsDuration(); delay >= 0 {
			return delay, true
		}
	}
	return 0, false
}

// retryAfterHeader reads Retry-After's delay-seconds; zero if it is absent
// or not a number of seconds.
func retryAfterHeader(h Header) time.Duration {
	values := h.Values(HeaderRetryAfter)
	if len(values) == 0 {
		return 0
	}
	n, err := strconv.ParseInt(strings.TrimSpace(values[0]), 10, 64)
	if err != nil || n < 0 {
		return 0
	}
	return seconds(n)
}
