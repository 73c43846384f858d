// Package clienttest holds what the tests of connectlimit's client packages
// share: a manual clock for a quota.Tracker, set through package hook.
package clienttest

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/client/internal/hook"
	"github.com/connectlimit/connectlimit/client/quota"
)

// Option returns the quota option that gives a tracker the clock c and the
// source of jitter random (values in [0, 1)); a nil c or random leaves the
// tracker's own.
func Option(c *FakeClock, random func() float64) quota.Option {
	var clock hook.Clock
	if c != nil {
		clock = c
	}
	return hook.WithClock(clock, random).(quota.Option) //nolint:forcetypeassert // quota sets the hook
}

// FakeClock is a manual clock for tests, safe for concurrent use. With
// auto set, Sleep advances the clock by its duration at once (tests of
// what the interceptor waits); otherwise Sleep blocks until Advance moves
// the clock past its end or its context ends.
type FakeClock struct {
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

// NewFakeClock returns a clock at start; auto makes Sleep return at once.
func NewFakeClock(start time.Time, auto bool) *FakeClock {
	return &FakeClock{now: start, auto: auto}
}

// Now returns the clock's present.
func (c *FakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Sleep records d and waits for it on the fake clock.
func (c *FakeClock) Sleep(ctx context.Context, d time.Duration) error {
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
func (c *FakeClock) Advance(d time.Duration) {
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
func (c *FakeClock) Slept() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.slept)
}

// WaitForSleepers waits (on the real clock, for up to 10 s) until n
// goroutines sleep on the clock.
func (c *FakeClock) WaitForSleepers(tb testing.TB, n int) {
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
