package llm_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
)

// fakeClock is a manual clock, safe for concurrent use.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// TestRateLimit walks the model's own limit (100 tokens a second, 200 at
// once) through calls at fixed instants. A prompt of "x" is 1 token.
func TestRateLimit(t *testing.T) {
	t.Parallel()
	type step struct {
		advance   time.Duration
		maxTokens int
		wantRetry time.Duration // 0: allowed
		wantLeft  int           // with wantRetry: Remaining
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"a burst, then the rate", []step{
			{maxTokens: 99},
			{maxTokens: 99},
			{maxTokens: 9, wantRetry: 100 * time.Millisecond, wantLeft: 0},
			{advance: 100 * time.Millisecond, maxTokens: 9},
		}},
		{"a refused call is not charged", []step{
			{maxTokens: 149},
			{maxTokens: 99, wantRetry: 500 * time.Millisecond, wantLeft: 50},
			{maxTokens: 49},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
			m := llm.New(llm.WithRateLimit(100, 200), llm.WithClock(clock.Now))
			for i, st := range tc.steps {
				clock.Advance(st.advance)
				_, err := m.Complete(t.Context(), "x", st.maxTokens, func(llm.Chunk) error { return nil })
				var limited *llm.RateLimitError
				switch {
				case st.wantRetry == 0 && err != nil:
					t.Fatalf("step %d: %v", i, err)
				case st.wantRetry == 0:
				case !errors.As(err, &limited) || !errors.Is(err, llm.ErrRateLimited):
					t.Fatalf("step %d: error %v, want a RateLimitError", i, err)
				case limited.RetryAfter != st.wantRetry || limited.Remaining != st.wantLeft || limited.Limit != 200:
					t.Fatalf("step %d: %+v, want retry after %v with %d left of 200", i, limited, st.wantRetry, st.wantLeft)
				}
			}
		})
	}
}

func TestRateLimitHeader(t *testing.T) {
	t.Parallel()
	e := &llm.RateLimitError{RetryAfter: 1250 * time.Millisecond, Limit: 200, Remaining: 12, Reset: 1880 * time.Millisecond}
	h := e.Header()
	for name, want := range map[string]string{
		"Retry-After":                  "2",
		"Retry-After-Ms":               "1250",
		"X-Ratelimit-Limit-Tokens":     "200",
		"X-Ratelimit-Remaining-Tokens": "12",
		"X-Ratelimit-Reset-Tokens":     "1.88s",
	} {
		if got := h.Get(name); got != want {
			t.Errorf("%s: %q, want %q", name, got, want)
		}
	}
}

func TestRateLimitTooLarge(t *testing.T) {
	t.Parallel()
	m := llm.New(llm.WithRateLimit(100, 200))
	if _, err := m.Complete(t.Context(), "x", 200, func(llm.Chunk) error { return nil }); !errors.Is(err, llm.ErrInvalidArgument) {
		t.Fatalf("a call over the burst: %v, want ErrInvalidArgument", err)
	}
}
