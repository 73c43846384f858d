package quota

import (
	"context"
	"math"
	"time"
)

// Tracker is what a client knows of a server's limits: the last known state
// of every bucket that responses reported, the calls in flight that pacing
// counts, and the retry and pacing settings. Create one with [NewTracker]
// per set of credentials (the server keeps buckets per caller, and so does
// the tracker). It is safe for concurrent use.
//
// An adapter uses it for every call: [Tracker.NewCall] when the call (or
// its first message) is about to be sent, [Call.Pace] before sending it,
// [Tracker.Observe] with every response's headers, a denial's metadata or a
// cut stream's trailers, [Call.Retry] after a denial that carries a
// google.rpc.RetryInfo, and [Tracker.Release] for a call that ended
// without a response to observe.
type Tracker struct {
	cfg   config
	state *quotaState
}

// NewTracker returns a Tracker configured by opts. It fails only for an
// invalid option, naming it.
func NewTracker(opts ...Option) (*Tracker, error) {
	cfg := newConfig(opts)
	if cfg.err != nil {
		return nil, cfg.err
	}
	return &Tracker{cfg: cfg, state: newQuotaState()}, nil
}

// Quota returns the last known state of the server's bucket named bucket,
// and false if no response has reported it yet.
func (t *Tracker) Quota(bucket string) (Quota, bool) {
	return t.state.get(bucket)
}

// Quotas returns the last known state of every bucket that responses have
// reported, sorted by name.
func (t *Tracker) Quotas() []Quota {
	return t.state.all()
}

// Subscribe calls f with the new state of a bucket each time a response
// reports it, starting at once with every bucket known so far (in name
// order), until the returned function is called. Calls to f are made one
// at a time and in the order the state changed, on the goroutine of a call
// that read a response (so f should be quick: hand the value to a channel
// or a UI loop). f may make calls through the tracker, and may
// unsubscribe: updates that arrive while f runs are delivered after it
// returns. After unsubscribe returns, f is not called again, except for a
// call already running. Unsubscribing twice is harmless.
func (t *Tracker) Subscribe(f func(Quota)) (unsubscribe func()) {
	return t.state.subscribe(f)
}

// Observe records the RateLimit, RateLimit-Policy and Connectlimit-Warning
// fields of h (a response's headers, a denial's metadata or a stream's
// trailers), read now on the tracker's clock, and hands the buckets it
// updated to the subscribers. It first settles reserved, the pacing
// reservation of the call that h answers ([Call.Pace]'s result; nil if
// none). An invalid line of a field is ignored; a response without the
// RateLimit field changes no bucket.
func (t *Tracker) Observe(h Header, reserved []Cost) {
	t.state.observe(h, t.cfg.clock.Now(), reserved)
}

// Release settles a pacing reservation ([Call.Pace]'s result) whose call
// ended without a response to observe.
func (t *Tracker) Release(reserved []Cost) {
	t.state.release(reserved)
}

// NewCall returns the [Call] of a call to procedure (e.g.
// "/aiservice.v1.AIService/Search") whose request, or first message, is
// msg.
func (t *Tracker) NewCall(procedure string, msg any) *Call {
	return &Call{cfg: &t.cfg, state: t.state, costs: t.costsOf(procedure, msg)}
}

// costsOf returns what a call to procedure with request msg costs, by
// bucket, as [WithCost] and [WithCostFunc] declare it.
func (t *Tracker) costsOf(procedure string, msg any) []Cost {
	var costs []Cost
	for _, c := range t.cfg.costs[procedure] {
		costs = addCost(costs, c)
	}
	for _, f := range t.cfg.costFuncs {
		for _, c := range f(procedure, msg) {
			if c.Bucket != "" && validTokens(c.Tokens) {
				costs = addCost(costs, c)
			}
		}
	}
	return costs
}

// Call is one call's share of a [Tracker]: its attempts and the time it has
// spent waiting, bounded by the tracker's settings. It is used by one call
// at a time: not safe for concurrent use.
type Call struct {
	cfg    *config
	state  *quotaState
	costs  []Cost
	waited time.Duration
	// attempts counts the times the call was sent.
	attempts int
}

// Attempt records that the call is being sent, the first time or again.
// [Call.Retry] allows a retry only while attempts are left.
func (c *Call) Attempt() { c.attempts++ }

// Pace holds the call until the last known state of its buckets says they
// can pay, and counts its costs as in flight; it returns them, to be
// settled with the call's response ([Tracker.Observe]) or without one
// ([Tracker.Release]). If the wait would exceed the call's budget, it
// returns at once and the call goes out unpaced. It returns an error only
// when ctx ends while it waits: ctx's error.
func (c *Call) Pace(ctx context.Context) ([]Cost, error) {
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

// Retry decides what to do after an attempt was denied with a RetryInfo
// delay: it waits the delay plus jitter and returns true when the call may
// be sent again, returns false at once when it may not (no attempt or
// wait left, or the wait would end after ctx's deadline), and returns ctx's
// error if ctx ends while it waits.
func (c *Call) Retry(ctx context.Context, delay time.Duration) (bool, error) {
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
func (c *Call) jitter(delay time.Duration) time.Duration {
	spread := math.Min(float64(delay)*jitterFraction, float64(maxJitter))
	return time.Duration(c.cfg.random() * spread)
}

// mayWait reports whether the call may wait d more: within its budget and
// ending before ctx's deadline (which, like every context deadline, is on
// the system clock).
func (c *Call) mayWait(ctx context.Context, d time.Duration) bool {
	if d > c.cfg.maxWait-c.waited {
		return false
	}
	deadline, ok := ctx.Deadline()
	return !ok || time.Until(deadline) > d
}

func (c *Call) sleep(ctx context.Context, d time.Duration) error {
	c.waited += d
	return c.cfg.clock.Sleep(ctx, d)
}
