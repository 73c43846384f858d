package client

import (
	"context"
	"math"
	"time"
)

// call is one call's share of the interceptor: its attempts and the time
// it has spent waiting, bounded by the configuration. It knows nothing of
// Connect's types, so that a connect-go v2 adapter can share it.
type call struct {
	cfg    *config
	state  *quotaState
	costs  []Cost
	waited time.Duration
	// attempts counts the times the call was sent.
	attempts int
}

func (i *Interceptor) newCall(procedure string, msg any) *call {
	return &call{cfg: &i.cfg, state: i.state, costs: i.costsOf(procedure, msg)}
}

// costsOf returns what a call to procedure with request msg costs, by
// bucket, as [WithCost] and [WithCostFunc] declare it.
func (i *Interceptor) costsOf(procedure string, msg any) []Cost {
	var costs []Cost
	for _, c := range i.cfg.costs[procedure] {
		costs = addCost(costs, c)
	}
	for _, f := range i.cfg.costFuncs {
		for _, c := range f(procedure, msg) {
			if c.Bucket != "" && validTokens(c.Tokens) {
				costs = addCost(costs, c)
			}
		}
	}
	return costs
}

// pace holds the call until the last known state of its buckets says they
// can pay, and counts its costs as in flight; it returns them, to be
// settled with the call's response. If the wait would exceed the call's
// budget, it returns at once and the call goes out unpaced. It returns an
// error only when ctx ends while it waits.
func (c *call) pace(ctx context.Context) ([]Cost, error) {
	if len(c.costs) == 0 {
		return nil, nil
	}
	for {
		now := c.cfg.clock.Now()
		reserved, wait := c.state.reserve(c.costs, now)
		if wait == 0 {
			return reserved, nil
		}
		if !c.mayWait(ctx, wait) {
			return nil, nil
		}
		if err := c.sleep(ctx, wait); err != nil {
			return nil, err
		}
	}
}

// retry decides what to do after an attempt was denied with a RetryInfo
// delay: it waits the delay plus jitter and returns true when the call may
// be sent again, returns false at once when it may not (no attempt or
// wait left), and returns ctx's error if ctx ends while it waits.
func (c *call) retry(ctx context.Context, delay time.Duration) (bool, error) {
	if c.attempts >= c.cfg.maxAttempts {
		return false, nil
	}
	wait := delay + c.jitter(delay)
	if !c.mayWait(ctx, wait) {
		return false, nil
	}
	if err := c.sleep(ctx, wait); err != nil {
		return false, err
	}
	return true, nil
}

// jitter returns a random extra wait: up to jitterFraction of delay, at
// most maxJitter.
func (c *call) jitter(delay time.Duration) time.Duration {
	spread := math.Min(float64(delay)*jitterFraction, float64(maxJitter))
	return time.Duration(c.cfg.random() * spread)
}

// mayWait reports whether the call may wait d more: within its budget and
// ending before ctx's deadline (which, like every context deadline, is on
// the system clock).
func (c *call) mayWait(ctx context.Context, d time.Duration) bool {
	if d > c.cfg.maxWait-c.waited {
		return false
	}
	deadline, ok := ctx.Deadline()
	return !ok || time.Until(deadline) > d
}

func (c *call) sleep(ctx context.Context, d time.Duration) error {
	c.waited += d
	return c.cfg.clock.Sleep(ctx, d)
}
