package outbound

import (
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Feedback is what the upstream said about one call, for [Permit.Done]. The
// zero Feedback is a call that went well and said nothing of its limits.
type Feedback struct {
	// Limited reports that the upstream refused the call for its rate
	// limit: HTTP 429, or gRPC or Connect resource_exhausted. The limiter
	// then slows down and pauses (see [Limiter]). A call refused for other
	// reasons (a 5xx, a bad request) is not Limited.
	Limited bool
	// RetryAfter is how long the upstream asked to wait before calling
	// again, when it says so outside Header: a google.rpc.RetryInfo
	// detail's delay, say. Zero if it did not say.
	RetryAfter time.Duration
	// Header is the response's header, or a Connect error's metadata. On
	// a refusal without RetryAfter, the limiter reads the wait from
	// retry-after-ms, else from Retry-After (seconds or an HTTP date): the
	// most precise wait the upstream gave. When there is none (on a
	// refusal without one, or on a call that went well), it reads the
	// OpenAI-style x-ratelimit-remaining-requests and
	// x-ratelimit-remaining-tokens with x-ratelimit-reset-requests and
	// x-ratelimit-reset-tokens ("1s", "6m0s", "20ms", or a number of
	// seconds): when a remaining count is 0, calls are held until its
	// reset. Nil is fine.
	Header http.Header
}

// ResponseFeedback returns the feedback of an HTTP response from the
// upstream: Limited for 429 Too Many Requests, and its header.
func ResponseFeedback(res *http.Response) Feedback {
	return Feedback{Limited: res.StatusCode == http.StatusTooManyRequests, Header: res.Header}
}

// signal reads f at now. The most precise wait the upstream gave wins: on
// a refusal, RetryAfter, else retry-after-ms, else Retry-After; only when
// it gave none, the reset of an exhausted x-ratelimit-* count (which, in
// OpenAI's headers, is the time until the whole budget is back: longer
// than needed).
func (f Feedback) signal(now time.Time) signal {
	s := signal{limited: f.Limited, drain: f.Limited}
	if left, ok := number(f.Header.Get("X-Ratelimit-Remaining-Tokens")); ok && (f.Limited || left == 0) {
		s.drain, s.drainTo = true, left
	}
	if f.Limited {
		s.pause = f.RetryAfter
		if s.pause <= 0 {
			s.pause = retryAfter(f.Header, now)
		}
	}
	if s.pause > 0 {
		return s
	}
	for _, dimension := range []string{"requests", "tokens"} {
		remaining, ok := number(f.Header.Get("X-Ratelimit-Remaining-" + dimension))
		if !ok || remaining > 0 {
			continue
		}
		if reset, ok := duration(f.Header.Get("X-Ratelimit-Reset-" + dimension)); ok {
			s.pause = max(s.pause, reset)
		}
	}
	return s
}

// retryAfter reads retry-after-ms or, without it, Retry-After
// (delay-seconds or an HTTP date, relative to now); zero when neither is
// there or valid.
func retryAfter(h http.Header, now time.Time) time.Duration {
	if ms, ok := number(h.Get("Retry-After-Ms")); ok {
		return fromSeconds(ms / 1000)
	}
	v := strings.TrimSpace(h.Get("Retry-After"))
	if secs, err := strconv.ParseUint(v, 10, 63); err == nil {
		return fromSeconds(float64(secs))
	}
	if at, err := http.ParseTime(v); err == nil && at.After(now) {
		return at.Sub(now)
	}
	return 0
}

// number parses a non-negative finite number; false if v is not one.
func number(v string) (float64, bool) {
	f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
	if err != nil || !(f >= 0) || math.IsInf(f, 1) {
		return 0, false
	}
	return f, true
}

// duration parses a reset time: a Go duration as OpenAI sends them ("1s",
// "6m0s", "20ms") or a number of seconds ("1.5"); false if v is neither or
// negative.
func duration(v string) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if d, err := time.ParseDuration(v); err == nil {
		return d, d >= 0
	}
	secs, ok := number(v)
	return fromSeconds(secs), ok
}

// fromSeconds converts seconds to a Duration, saturating.
func fromSeconds(s float64) time.Duration {
	if s*1e9 >= math.MaxInt64 {
		return math.MaxInt64
	}
	return time.Duration(s * 1e9)
}
