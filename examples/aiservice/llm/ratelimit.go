package llm

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// ErrRateLimited is wrapped by the error [Model.Complete] returns when the
// model's own rate limit (see [WithRateLimit]) refuses a call, as a
// provider answers HTTP 429 or gRPC resource_exhausted. Such an error is a
// [*RateLimitError].
var ErrRateLimited = errors.New("llm: rate limit exceeded")

// RateLimitError says that the model refused a call because calls came
// faster than its rate limit, and when to try again, in the forms real
// providers use.
type RateLimitError struct {
	// RetryAfter is the exact wait until the call would be allowed, as a
	// google.rpc.RetryInfo carries it.
	RetryAfter time.Duration
	// Limit is how many tokens the model allows at once (its burst).
	Limit int
	// Remaining is how many whole tokens the model would allow now.
	Remaining int
	// Reset is how long until the model allows Limit tokens again.
	Reset time.Duration
}

// Error implements error.
func (e *RateLimitError) Error() string {
	return fmt.Sprintf("%v: retry in %v", ErrRateLimited, e.RetryAfter.Round(time.Millisecond))
}

// Unwrap returns [ErrRateLimited].
func (e *RateLimitError) Unwrap() error { return ErrRateLimited }

// Header returns the response header an HTTP provider sends with such a
// 429, in OpenAI's form: Retry-After (whole seconds, rounded up),
// retry-after-ms, and x-ratelimit-limit-tokens,
// x-ratelimit-remaining-tokens and x-ratelimit-reset-tokens (a duration
// such as "1.5s").
func (e *RateLimitError) Header() http.Header {
	h := http.Header{}
	h.Set("Retry-After", strconv.FormatInt(int64(math.Ceil(e.RetryAfter.Seconds())), 10))
	h.Set("Retry-After-Ms", strconv.FormatInt(e.RetryAfter.Milliseconds(), 10))
	h.Set("X-Ratelimit-Limit-Tokens", strconv.Itoa(e.Limit))
	h.Set("X-Ratelimit-Remaining-Tokens", strconv.Itoa(e.Remaining))
	h.Set("X-Ratelimit-Reset-Tokens", e.Reset.String())
	return h
}

// WithRateLimit gives the model a rate limit of its own, like a provider's
// tokens-per-minute limit: each call to [Model.Complete] takes its prompt's
// tokens plus maxTokens (what providers count when a request arrives) from
// a bucket that holds burst tokens and refills at tokensPerSecond. A call
// the bucket cannot pay fails at once with a [*RateLimitError], one that
// costs more than burst with an error wrapping [ErrInvalidArgument]. By
// default the model has no limit; a rate or burst of 0 or less means none.
func WithRateLimit(tokensPerSecond, burst float64) Option {
	return optionFunc(func(m *Model) {
		if tokensPerSecond <= 0 || burst <= 0 {
			m.limit = nil
			return
		}
		m.limit = &rateLimit{perSecond: tokensPerSecond, burst: burst, level: burst, now: time.Now}
	})
}

// withClock sets the clock of the model's rate limit, for tests.
func withClock(now func() time.Time) Option {
	return optionFunc(func(m *Model) {
		if m.limit != nil {
			m.limit.now = now
		}
	})
}

// rateLimit is a token bucket, safe for concurrent use.
type rateLimit struct {
	perSecond, burst float64
	now              func() time.Time

	mu    sync.Mutex
	level float64
	at    time.Time // of level; zero before the first call
}

// take charges cost tokens, or says why it cannot.
func (r *rateLimit) take(cost int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	if !r.at.IsZero() && now.After(r.at) {
		r.level = math.Min(r.burst, r.level+now.Sub(r.at).Seconds()*r.perSecond)
	}
	r.at = now
	c := float64(cost)
	if c > r.burst {
		return fmt.Errorf("%w: a call of %d tokens is more than the model's limit of %v at once", ErrInvalidArgument, cost, r.burst)
	}
	if r.level < c {
		return &RateLimitError{
			RetryAfter: seconds((c - r.level) / r.perSecond),
			Limit:      int(r.burst),
			Remaining:  int(r.level),
			Reset:      seconds((r.burst - r.level) / r.perSecond),
		}
	}
	r.level -= c
	return nil
}

// seconds converts seconds to a Duration, rounded up to the millisecond so
// that waiting it is always enough.
func seconds(s float64) time.Duration {
	return time.Duration(math.Ceil(s*1e3)) * time.Millisecond
}
