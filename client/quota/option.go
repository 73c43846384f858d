package quota

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	"github.com/connectlimit/connectlimit/client/internal/hook"
)

// DefaultMaxAttempts is how many times a call is sent at most, the first
// time included, unless set with [WithRetry] or [WithoutRetry]: a call
// denied with a google.rpc.RetryInfo is retried at most twice.
const DefaultMaxAttempts = 3

// DefaultMaxWait bounds the total time one call spends waiting (for retries
// and for pacing), unless set with [WithMaxWait]. A denial that asks for a
// longer wait is returned at once: by then a user is better served by an
// error that says how long to wait (see [DescribeDenial]) than by a call
// that hangs.
const DefaultMaxWait = 10 * time.Second

// The jitter added to a RetryInfo wait: a random share of up to
// jitterFraction of the wait, and at most maxJitter, so that clients denied
// together do not all come back at the same instant.
const (
	jitterFraction = 0.1
	maxJitter      = time.Second
)

// Option configures a [Tracker].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	maxAttempts int
	maxWait     time.Duration
	costs       map[string][]Cost
	costFuncs   []CostFunc
	err         error
	// clock and random are the tracker's time and jitter; the client
	// packages' tests replace them through package hook.
	clock  hook.Clock
	random func() float64
}

func newConfig(opts []Option) config {
	c := config{
		maxAttempts: DefaultMaxAttempts,
		maxWait:     DefaultMaxWait,
		costs:       map[string][]Cost{},
		clock:       systemClock{},
		random:      rand.Float64,
	}
	for _, o := range opts {
		o.apply(&c)
	}
	return c
}

// WithRetry sets how many times a call is sent at most, the first time
// included; the default is [DefaultMaxAttempts]. [Call.Retry] allows a
// retry only while the call has attempts left, the wait stays within
// [WithMaxWait], and the wait ends before the context's deadline. Which
// denials are worth retrying is the adapters' decision: a connectlimit
// server denies a call before its handler runs and charges nothing for it,
// so they retry denials that carry a google.rpc.RetryInfo, even for calls
// that are not idempotent.
func WithRetry(maxAttempts int) Option {
	return optionFunc(func(c *config) {
		if maxAttempts < 1 {
			c.err = fmt.Errorf("quota: max attempts must be at least 1, got %d", maxAttempts)
			return
		}
		c.maxAttempts = maxAttempts
	})
}

// WithoutRetry turns retries off: every call is sent once. It is shorthand
// for WithRetry(1).
func WithoutRetry() Option {
	return WithRetry(1)
}

// WithMaxWait bounds the total time one call may wait, for its retries and
// its pacing together; the default is [DefaultMaxWait]. A retry or pacing
// wait that would go past the bound, or past the context's deadline, is not
// started: a denial is returned as it is, and a paced call is sent at once
// for the server to decide. Zero turns all waiting off.
func WithMaxWait(d time.Duration) Option {
	return optionFunc(func(c *config) {
		if d < 0 {
			c.err = fmt.Errorf("quota: max wait must not be negative, got %v", d)
			return
		}
		c.maxWait = d
	})
}

// WithCost declares that every call to procedure (e.g.
// "/aiservice.v1.AIService/Search") takes tokens from the server's bucket,
// which turns on pacing for it: before the call is sent, [Call.Pace]
// estimates, from the last RateLimit and RateLimit-Policy headers the
// tracker read for the bucket and the calls it has in flight, whether the
// bucket can pay, and if not holds the call until it can (at most
// [WithMaxWait]) instead of letting it go out to be denied. Declare each
// bucket of a procedure with its own WithCost; declaring one twice adds the
// tokens.
//
// Pacing is an estimate: the server decides. Until a response has reported
// a bucket, and for a bucket that can never pay (tokens over its
// capacity), calls go out at once. The state is per tracker, so calls that
// other processes make with the same credentials are seen only through the
// headers of later responses. By default no procedure is paced.
func WithCost(procedure, bucket string, tokens float64) Option {
	return optionFunc(func(c *config) {
		if procedure == "" || bucket == "" || !validTokens(tokens) {
			c.err = fmt.Errorf("quota: WithCost(%q, %q, %v): want a procedure, a bucket and tokens >= 0", procedure, bucket, tokens)
			return
		}
		c.costs[procedure] = addCost(c.costs[procedure], Cost{Bucket: bucket, Tokens: tokens})
	})
}

// WithCostFunc paces calls whose cost depends on their request (see
// [WithCost] for what pacing does): f's costs are added to those declared
// with WithCost. By default there is none.
func WithCostFunc(f CostFunc) Option {
	return optionFunc(func(c *config) {
		if f != nil {
			c.costFuncs = append(c.costFuncs, f)
		}
	})
}

func validTokens(t float64) bool { return t >= 0 && !math.IsInf(t, 1) }

// addCost adds c to costs, summing tokens of one bucket.
func addCost(costs []Cost, c Cost) []Cost {
	for i := range costs {
		if costs[i].Bucket == c.Bucket {
			costs[i].Tokens += c.Tokens
			return costs
		}
	}
	return append(costs, c)
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

func init() {
	// Tests of the client packages set the clock and the jitter of the
	// trackers they build through package hook: the public API has no such
	// option.
	hook.WithClock = func(c hook.Clock, random func() float64) any {
		return optionFunc(func(cfg *config) {
			if c != nil {
				cfg.clock = c
			}
			if random != nil {
				cfg.random = random
			}
		})
	}
}
