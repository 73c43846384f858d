package client

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"time"
)

// DefaultMaxAttempts is how many times a call is sent at most, the first
// time included, unless set with [WithRetry] or [WithoutRetry]: a call
// denied with a google.rpc.RetryInfo is retried at most twice.
const DefaultMaxAttempts = 3

// DefaultMaxWait bounds the total time one call spends waiting in the
// interceptor (for retries and for pacing), unless set with [WithMaxWait].
// A denial that asks for a longer wait is returned at once: by then a user
// is better served by an error that says how long to wait (see
// [Describe]) than by a call that hangs.
const DefaultMaxWait = 10 * time.Second

// The jitter added to a RetryInfo wait: a random share of up to
// jitterFraction of the wait, and at most maxJitter, so that clients denied
// together do not all come back at the same instant.
const (
	jitterFraction = 0.1
	maxJitter      = time.Second
)

// Cost is what a call takes from one of the server's buckets, for pacing
// (see [WithCost]).
type Cost struct {
	// Bucket names the bucket, as the server's RateLimit header does.
	Bucket string
	// Tokens is how many tokens the call takes from it, >= 0.
	Tokens float64
}

// CostFunc returns what a call to procedure (e.g.
// "/aiservice.v1.AIService/GenerateReport") with request message msg costs,
// for pacing. msg is the unary request or the first message a stream sends
// (a pointer to the generated type). It must be safe for concurrent use and
// fast: it runs before every call. Costs with an empty bucket or a negative
// or non-finite number of tokens are ignored.
type CostFunc func(procedure string, msg any) []Cost

// Option configures an [Interceptor].
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
	// clock and random are the interceptor's time and jitter; tests
	// override them through export_test.go.
	clock  clock
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
// included; the default is [DefaultMaxAttempts]. Only a denial with
// [connect.CodeResourceExhausted] and a google.rpc.RetryInfo detail is
// retried, after at least the RetryInfo's delay, and only while the total
// wait stays within [WithMaxWait] and before the context's deadline. A
// connectlimit server denies a call before its handler runs and charges
// nothing for it, so retrying a denial is safe even for calls that are not
// idempotent.
//
// Unary calls and server streams are retried; a server stream only when
// the denial ends it before its first message (which is when a
// connectlimit server denies a stream's reservation), by sending its
// request again on a new stream. Client and bidi streams are never
// retried: their messages are sent as the caller produces them, and the
// interceptor does not keep them to send again.
func WithRetry(maxAttempts int) Option {
	return optionFunc(func(c *config) {
		if maxAttempts < 1 {
			c.err = fmt.Errorf("client: max attempts must be at least 1, got %d", maxAttempts)
			return
		}
		c.maxAttempts = maxAttempts
	})
}

// WithoutRetry turns retries off: every call is sent once, and denials go
// back to the caller as they are. It is shorthand for WithRetry(1).
func WithoutRetry() Option {
	return WithRetry(1)
}

// WithMaxWait bounds the total time one call may wait in the interceptor,
// for its retries and its pacing together; the default is
// [DefaultMaxWait]. A retry or pacing wait that would go past the bound, or
// past the context's deadline, is not started: a denial is returned as it
// is, and a paced call is sent at once for the server to decide. Zero
// turns all waiting off.
func WithMaxWait(d time.Duration) Option {
	return optionFunc(func(c *config) {
		if d < 0 {
			c.err = fmt.Errorf("client: max wait must not be negative, got %v", d)
			return
		}
		c.maxWait = d
	})
}

// WithCost declares that every call to procedure (e.g.
// "/aiservice.v1.AIService/Search") takes tokens from the server's bucket,
// which turns on pacing for it: before the call is sent, the interceptor
// estimates, from the last RateLimit and RateLimit-Policy headers it read
// for the bucket and the calls it has in flight, whether the bucket can pay,
// and if not holds the call until it can (at most [WithMaxWait]) instead of
// sending a call that would certainly be denied. Declare each bucket of a
// procedure with its own WithCost; declaring one twice adds the tokens.
//
// Pacing is an estimate: the server decides. Until a response has reported
// a bucket, and for a bucket that can never pay (tokens over its
// capacity), calls go out at once. The state is per interceptor, so calls
// that other processes make with the same credentials are seen only
// through the headers of later responses; a denial they cause is retried as
// usual (see [WithRetry]). By default no procedure is paced.
func WithCost(procedure, bucket string, tokens float64) Option {
	return optionFunc(func(c *config) {
		if procedure == "" || bucket == "" || !validTokens(tokens) {
			c.err = fmt.Errorf("client: WithCost(%q, %q, %v): want a procedure, a bucket and tokens >= 0", procedure, bucket, tokens)
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

// withClock sets the interceptor's clock, for tests.
func withClock(c clock) Option {
	return optionFunc(func(cfg *config) { cfg.clock = c })
}

// withRandom sets the source of jitter, a function returning values in
// [0, 1), for tests.
func withRandom(f func() float64) Option {
	return optionFunc(func(c *config) { c.random = f })
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

// clock is the interceptor's time: what the present is, and how to wait.
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
