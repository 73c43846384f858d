// Package fakeclock is a manual clock with a Sleep, for the tests of code
// that waits (the client interceptors' retries and pacing, the outbound
// limiter): tests advance it, or let every Sleep advance it at once, and
// read back what was waited for.
package fakeclock

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// Clock is a manual clock for tests, safe for concurrent use. With
// auto set, Sleep advances the clock by its duration at once (tests of
// what a caller waits); otherwise Sleep blocks until Advance moves
// the clock past its end or its context ends.
type Clock struct {
	mu       sync.Mutex
	now      time.Time
	auto     bool
	sleepers []*sleeper
	slept    []time.Duration
}

type sleeper struct {
	until time.Time
	done  chan struct{}
}

// New returns a clock at start; auto makes Sleep return at once.
func New(start time.Time, auto bool) *Clock {
	return &Clock{now: start, auto: auto}
}

// Now returns the clock's present.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Sleep records d and waits for it on the fake clock.
func (c *Clock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	c.slept = append(c.slept, d)
	if c.auto || d <= 0 {
		c.now = c.now.Add(max(d, 0))
		c.mu.Unlock()
		return nil
	}
	s := &sleeper{until: c.now.Add(d), done: make(chan struct{})}
	c.sleepers = append(c.sleepers, s)
	c.mu.Unlock()
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		c.mu.Lock()
		c.sleepers = slices.DeleteFunc(c.sleepers, func(o *sleeper) bool { return o == s })
		c.mu.Unlock()
		return ctx.Err()
	}
}

// Advance moves the clock forward by d and wakes the sleepers whose wait
// is over.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.sleepers = slices.DeleteFunc(c.sleepers, func(s *sleeper) bool {
		if s.until.After(c.now) {
			return false
		}
		close(s.done)
		return true
	})
}

// Slept returns every duration Sleep was asked for, in order.
func (c *Clock) Slept() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.slept)
}

// WaitForSleepers waits (on the real clock, for up to 10 s) until n
// goroutines sleep on the clock.
func (c *Clock) WaitForSleepers(tb testing.TB, n int) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		got := len(c.sleepers)
		c.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%d goroutines sleep on the fake clock, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}
