package outbound

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// DefaultMaxInFlight is how many calls a [Limiter] lets run at once, unless
// set with [WithMaxInFlight] or [WithoutMaxInFlight]: enough to keep a
// provider busy, few enough that a burst does not open hundreds of
// connections at once.
const DefaultMaxInFlight = 32

// Defaults of the adaptation to upstream pushback (see [Limiter]), unless set
// with [WithBackoff], [WithRecovery] and [WithPause].
const (
	// DefaultBackoff is the factor the rate is multiplied by when the
	// upstream refuses a call: it is halved.
	DefaultBackoff = 0.5
	// DefaultMinShare is the lowest share of the configured rate the
	// backoff goes down to: a tenth.
	DefaultMinShare = 0.1
	// DefaultRecovery is how much of the configured rate comes back each
	// second without pushback: 5%, so that a halved rate is whole again
	// 10 s after its last pause.
	DefaultRecovery = 0.05
	// DefaultPause is how long calls are held after a refusal that does
	// not say how long to wait.
	DefaultPause = time.Second
	// DefaultMaxPause bounds every pause, whatever the upstream asks, so
	// that a malformed header cannot stop calls for hours.
	DefaultMaxPause = time.Minute
)

// DefaultStoreTimeout bounds one store call of a [Limiter], unless set with
// [WithStoreTimeout]. A store call is not cut short by the caller's
// context, so that its outcome is always known or resolved.
const DefaultStoreTimeout = time.Second

// Option configures a [Limiter].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	requests     *bucket.Limit
	maxInFlight  int
	backoff      float64
	minShare     float64
	recovery     float64
	pause        time.Duration
	maxPause     time.Duration
	storeTimeout time.Duration
	logger       *slog.Logger
	err          error
	// clock is the limiter's time; tests override it through
	// export_test.go.
	clock clock
}

func newConfig(opts []Option) config {
	c := config{
		maxInFlight:  DefaultMaxInFlight,
		backoff:      DefaultBackoff,
		minShare:     DefaultMinShare,
		recovery:     DefaultRecovery,
		pause:        DefaultPause,
		maxPause:     DefaultMaxPause,
		storeTimeout: DefaultStoreTimeout,
		logger:       slog.Default(),
		clock:        systemClock{},
	}
	for _, o := range opts {
		o.apply(&c)
	}
	return c
}

func (c *config) fail(format string, args ...any) {
	if c.err == nil {
		c.err = fmt.Errorf("outbound: "+format, args...)
	}
}

// WithRequestLimit adds a second bucket, "requests", that every call takes
// one token from, for upstreams that limit requests as well as tokens (an
// LLM provider's RPM beside its TPM). By default only tokens are limited.
func WithRequestLimit(limit bucket.Limit) Option {
	return optionFunc(func(c *config) {
		if err := limit.Validate(); err != nil {
			c.fail("request limit: %w", err)
			return
		}
		c.requests = &limit
	})
}

// WithMaxInFlight caps how many permits may be out at once (granted by
// [Limiter.Wait] and not yet [Permit.Done]); further callers wait for a
// slot, in arrival order. The default is [DefaultMaxInFlight]; n must be
// at least 1.
func WithMaxInFlight(n int) Option {
	return optionFunc(func(c *config) {
		if n < 1 {
			c.fail("max in flight must be at least 1, got %d", n)
			return
		}
		c.maxInFlight = n
	})
}

// WithoutMaxInFlight removes the cap on calls in flight: only the buckets
// limit them.
func WithoutMaxInFlight() Option {
	return optionFunc(func(c *config) { c.maxInFlight = 0 })
}

// WithBackoff sets the multiplicative decrease: each refusal by the
// upstream (see [Feedback.Limited]) multiplies the allowed rate by factor,
// in (0, 1), but never below minShare of the configured rate, in (0, 1].
// The defaults are [DefaultBackoff] and [DefaultMinShare].
func WithBackoff(factor, minShare float64) Option {
	return optionFunc(func(c *config) {
		if !(factor > 0 && factor < 1) || !(minShare > 0 && minShare <= 1) {
			c.fail("backoff factor must be in (0, 1) and min share in (0, 1], got %v and %v", factor, minShare)
			return
		}
		c.backoff, c.minShare = factor, minShare
	})
}

// WithRecovery sets the additive increase: after a slowdown, the allowed
// rate grows back by perSecond of the configured rate each second (once
// any pause has ended), up to the configured rate. The default is
// [DefaultRecovery]; perSecond must be greater than 0.
func WithRecovery(perSecond float64) Option {
	return optionFunc(func(c *config) {
		if !(perSecond > 0) {
			c.fail("recovery must be greater than 0, got %v", perSecond)
			return
		}
		c.recovery = perSecond
	})
}

// WithPause sets how long calls are held after a refusal that says nothing
// of when to retry (pause), and the longest any pause may be (maxPause).
// The defaults are [DefaultPause] and [DefaultMaxPause]; both must be
// positive.
func WithPause(pause, maxPause time.Duration) Option {
	return optionFunc(func(c *config) {
		if pause <= 0 || maxPause <= 0 {
			c.fail("pauses must be greater than 0, got %v and %v", pause, maxPause)
			return
		}
		c.pause, c.maxPause = pause, maxPause
	})
}

// WithStoreTimeout bounds each store call; the default is
// [DefaultStoreTimeout]. Store calls are not cut short by the caller's
// context (an abandoned call whose outcome is unknown would have to be
// resolved anyway), so this is the most a canceled Wait may take to return.
func WithStoreTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) {
		if d <= 0 {
			c.fail("store timeout must be greater than 0, got %v", d)
			return
		}
		c.storeTimeout = d
	})
}

// WithLogger sets where slowdowns (at Info) and pauses (at Debug) are
// logged. The default is [slog.Default].
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}

// withClock sets the limiter's clock, for tests.
func withClock(cl clock) Option {
	return optionFunc(func(c *config) { c.clock = cl })
}

// clock is the limiter's time: what the present is, and how to wait.
type clock interface {
	Now() time.Time
	// Sleep waits for d, or until ctx is done, when it returns ctx's
	// error.
	Sleep(ctx context.Context, d time.Duration) error
}

type systemClock struct{}

// Now returns the system's present.
func (systemClock) Now() time.Time { return time.Now() }

// Sleep waits on a timer.
func (systemClock) Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
