package interceptor

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/connectlimit/connectlimit/bucket"
)

// Header names set by the interceptor. RateLimit-Policy and RateLimit follow
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

// HeaderNames returns the names of every response header the interceptor
// may set, for servers that list them in CORS's Access-Control-Expose-Headers
// so that browser code on another origin can read them.
func HeaderNames() []string {
	return []string{HeaderRateLimit, HeaderRateLimitPolicy, HeaderRetryAfter, HeaderWarning}
}

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
	worst, _ := d.Denying()
	var msg string
	if worst.OverCapacity() {
		msg = fmt.Sprintf("connectlimit: a call costs %s tokens but bucket %q holds at most %s, so it can never be allowed",
			formatTokens(worst.Cost), worst.Bucket, formatTokens(worst.Limit.Capacity))
	} else {
		msg = fmt.Sprintf("connectlimit: rate limit exceeded for bucket %q: retry in %v",
			worst.Bucket, d.RetryAfter.Round(time.Millisecond))
	}
	err := connect.NewError(connect.CodeResourceExhausted, errors.New(msg))
	if !worst.OverCapacity() && d.RetryAfter > 0 {
		if detail, e := connect.NewErrorDetail(&errdetails.RetryInfo{RetryDelay: durationpb.New(d.RetryAfter)}); e == nil {
			err.AddDetail(detail)
		}
		err.Meta().Set(HeaderRetryAfter, strconv.FormatInt(ceilSeconds(d.RetryAfter), 10))
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
	if detail, e := connect.NewErrorDetail(qf); e == nil {
		err.AddDetail(detail)
	}
	setRateLimitHeaders(err.Meta(), &d)
	return err
}

// setHeaders writes the RateLimit fields of a decision and, if some bucket
// is running low, the warning field. A nil decision writes nothing.
func (i *Interceptor) setHeaders(h http.Header, d *bucket.Decision) {
	if d == nil {
		return
	}
	setRateLimitHeaders(h, d)
	if i.cfg.warnBelow <= 0 {
		return
	}
	var warn strings.Builder
	for _, b := range d.Buckets {
		if b.Remaining >= i.cfg.warnBelow*b.Limit.Capacity {
			continue
		}
		if warn.Len() > 0 {
			warn.WriteString(", ")
		}
		fmt.Fprintf(&warn, "%q;r=%d;q=%d", b.Bucket, int64(math.Max(0, b.Remaining)), int64(b.Limit.Capacity))
	}
	if warn.Len() > 0 {
		h.Set(HeaderWarning, warn.String())
	} else {
		h.Del(HeaderWarning)
	}
}

// setRateLimitHeaders writes the RateLimit-Policy and RateLimit fields for
// every bucket of a decision.
func setRateLimitHeaders(h http.Header, d *bucket.Decision) {
	var policy, state strings.Builder
	for i, b := range d.Buckets {
		if i > 0 {
			policy.WriteString(", ")
			state.WriteString(", ")
		}
		window := int64(min(math.Ceil(b.Limit.Capacity/b.Limit.RefillPerSecond), math.MaxInt32))
		fmt.Fprintf(&policy, "%q;q=%d;w=%d", b.Bucket, int64(b.Limit.Capacity), window)
		fmt.Fprintf(&state, "%q;r=%d;t=%d", b.Bucket, int64(math.Max(0, b.Remaining)), ceilSeconds(b.ResetAfter))
	}
	h.Set(HeaderRateLimitPolicy, policy.String())
	h.Set(HeaderRateLimit, state.String())
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
