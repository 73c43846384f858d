// Package outbound paces calls from this process to a rate-limited
// upstream API, such as an LLM provider, through a [bucket.Store]: a
// [Limiter] makes callers wait, instead of denying them, until the store's
// bucket can pay, adapts to the upstream's pushback, and caps the calls in
// flight. It is the outbound counterpart of the interceptor package (which
// limits calls coming in), and needs neither Connect nor a server.
//
// With a memstore the budget is this process's; with a redisstore it is
// shared by every process that names the same upstream.
//
//	lim, err := outbound.New(redisstore.New(rdb), "openai", bucket.Limit{Capacity: 30_000, RefillPerSecond: 500})
//	permit, err := lim.Wait(ctx, promptTokens+maxTokens) // waits; nil error means charged
//	res, err := http.DefaultClient.Do(req)
//	permit.Done(outbound.ResponseFeedback(res))          // 429, Retry-After, x-ratelimit-*: slow down
package outbound

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// Bucket names in the store, under the subject "outbound:<name>".
const (
	// TokensBucket is the bucket [Limiter.Wait] charges its tokens to.
	TokensBucket = "tokens"
	// RequestsBucket is the bucket that every call takes one token from,
	// with [WithRequestLimit].
	RequestsBucket = "requests"
)

// resolveAttempts is how many times a limiter asks the store whether a
// take whose reply was lost was applied, before it gives up.
const resolveAttempts = 3

// ErrOverCapacity is returned by [Limiter.Wait] for a cost that the bucket
// can never pay: more tokens than its capacity.
var ErrOverCapacity = errors.New("outbound: cost exceeds the bucket's capacity")

// Limiter paces calls to one upstream. Create one with [New]; it is safe
// for concurrent use.
//
// [Limiter.Wait] takes the call's cost from the store's "tokens" bucket
// (and one token from "requests", with [WithRequestLimit]) under the
// subject "outbound:<name>", waiting until it can: it asks the store, and
// when the store denies, sleeps the store's RetryAfter and asks again.
// Waiters are served in arrival order within a process; at most
// [WithMaxInFlight] permits are out at once.
//
// The store's semantics are kept exactly: Wait returns a nil error if and
// only if it charged the cost. A denied take changes nothing, so a Wait
// abandoned by its context charges nothing. A take whose reply was lost
// (bucket.ErrOutcomeUnknown) carries an ID, and is resolved at once by
// asking the store with the same ID: charged, it is a permit; not
// charged, the wait goes on. A store failure that charged nothing is
// returned to the caller, who decides whether to call the upstream
// unmetered.
//
// # Adaptation (AIMD)
//
// The configured limit is what the upstream is expected to allow; the
// limiter allows a share of it, 1 at first. When the upstream refuses a
// call ([Feedback.Limited]):
//
//   - multiplicative decrease: the share is multiplied by [DefaultBackoff]
//     (0.5), not below [DefaultMinShare] (0.1), once per round of calls:
//     refusals of calls granted before the last cut do not cut again;
//   - pause: new calls are held for the wait the upstream asked for (see
//     [Feedback]: a RetryInfo delay, else retry-after-ms, else
//     Retry-After, else the reset of an exhausted x-ratelimit-* count), or
//     [DefaultPause] (1s) if it asked for none, at most [DefaultMaxPause]
//     (1m);
//   - additive increase: from the end of the pause, the share grows back by
//     [DefaultRecovery] (0.05) a second, up to 1.
//
// A refusal also drains the limiter's bucket down to the tokens the
// upstream says it has left (x-ratelimit-remaining-tokens, or 0), since the
// bucket evidently holds more than the upstream will accept; a call that
// succeeds with a count of 0 left drains it too, and pauses new calls until
// that count's reset, without a cut. The share scales both
// the refill rate and the capacity of the limits sent to the store (never
// below the cost of the call), so a slowed limiter also bursts less; with a
// shared store, each process adapts on its own, and the bucket refills at
// the share of whichever process takes from it. The cost of a refused call
// stays charged.
type Limiter struct {
	store    bucket.Store
	name     string
	subject  string
	tokens   bucket.Limit
	cfg      config
	aimd     aimd
	idPrefix string
	ids      atomic.Uint64

	slots chan struct{} // nil without a cap on calls in flight
	turn  chan struct{} // held by the one waiter that asks the store
	inUse atomic.Int64

	mu    sync.Mutex
	adapt adaptation
}

// New returns a Limiter for the upstream called name (it names the
// buckets in the store: limiters of several processes with one name and
// one shared store share one budget) whose tokens are limited by tokens,
// keeping its buckets in store. It fails for an empty name, an invalid
// limit or option, naming it.
func New(store bucket.Store, name string, tokens bucket.Limit, opts ...Option) (*Limiter, error) {
	if store == nil || name == "" {
		return nil, errors.New("outbound: New needs a store and an upstream name")
	}
	if err := tokens.Validate(); err != nil {
		return nil, fmt.Errorf("outbound: token limit: %w", err)
	}
	cfg := newConfig(opts)
	if cfg.err != nil {
		return nil, cfg.err
	}
	var prefix [8]byte
	_, _ = rand.Read(prefix[:]) // never fails
	l := &Limiter{
		store:    store,
		name:     name,
		subject:  "outbound:" + name,
		tokens:   tokens,
		cfg:      cfg,
		aimd:     aimd{backoff: cfg.backoff, minShare: cfg.minShare, recovery: cfg.recovery, pause: cfg.pause, maxPause: cfg.maxPause},
		idPrefix: "outbound." + hex.EncodeToString(prefix[:]) + ".",
		turn:     make(chan struct{}, 1),
	}
	if cfg.maxInFlight > 0 {
		l.slots = make(chan struct{}, cfg.maxInFlight)
	}
	return l, nil
}

// Permit is a call [Limiter.Wait] let go. Report how the call went with
// [Permit.Done], which also frees its slot among the calls in flight.
type Permit struct {
	l     *Limiter
	epoch uint64
	done  atomic.Bool
}

// Wait waits until the store can pay tokens (and a request, with
// [WithRequestLimit]), charges them, and returns a permit for the call;
// the caller must call [Permit.Done] once the call is over. tokens must be
// between 0 and the limit's capacity, or Wait returns an error wrapping
// [ErrOverCapacity].
//
// Wait returns a nil error exactly when it charged the cost. It returns
// ctx's error if ctx ends first (nothing charged), and the store's error if
// the store fails: wrapping [bucket.ErrNotApplied] when nothing was charged,
// and [bucket.ErrOutcomeUnknown] when the store may have charged and did
// not answer when asked again.
func (l *Limiter) Wait(ctx context.Context, tokens float64) (*Permit, error) {
	if !(tokens >= 0 && tokens <= l.tokens.Capacity) {
		return nil, fmt.Errorf("%w: %v tokens, capacity %v", ErrOverCapacity, tokens, l.tokens.Capacity)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if l.slots != nil {
		select {
		case l.slots <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	p, err := l.waitTurn(ctx, tokens)
	if err != nil {
		l.freeSlot()
		return nil, err
	}
	l.inUse.Add(1)
	return p, nil
}

// waitTurn waits for the turn to ask the store, then for the store.
func (l *Limiter) waitTurn(ctx context.Context, tokens float64) (*Permit, error) {
	select {
	case l.turn <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-l.turn }()
	return l.take(ctx, tokens)
}

// take asks the store until it charges tokens.
func (l *Limiter) take(ctx context.Context, tokens float64) (*Permit, error) {
	id := l.newID()
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		now := l.cfg.clock.Now()
		l.mu.Lock()
		share, pausedUntil, epoch := l.adapt.shareAt(now, l.aimd), l.adapt.pausedUntil, l.adapt.epoch
		l.mu.Unlock()
		if pausedUntil.After(now) {
			if err := l.cfg.clock.Sleep(ctx, pausedUntil.Sub(now)); err != nil {
				return nil, err
			}
			continue
		}
		l.mu.Lock()
		drainTo, drain := l.adapt.takeDrain(now, l.tokens.RefillPerSecond*share)
		l.mu.Unlock()
		if drain {
			l.drain(ctx, share, drainTo)
		}
		req := l.request(id, tokens, share)
		d, err := l.takeOnce(ctx, req)
		if err != nil {
			if !bucket.MayHaveApplied(err) {
				return nil, fmt.Errorf("outbound: %s: store failed, nothing charged: %w", l.name, err)
			}
			applied, err := l.resolve(ctx, req)
			switch {
			case err != nil:
				return nil, fmt.Errorf("outbound: %s: store failed, the call may have been charged: %w", l.name, err)
			case applied:
				return &Permit{l: l, epoch: epoch}, nil
			}
			id = l.newID() // the old one is now recorded, fencing the lost take
			continue
		}
		if d.Allowed {
			return &Permit{l: l, epoch: epoch}, nil
		}
		if d.OverCapacity() { // only if the store disagrees on the limit
			return nil, fmt.Errorf("%w: the store denied %v tokens for good", ErrOverCapacity, tokens)
		}
		if err := l.cfg.clock.Sleep(ctx, d.RetryAfter); err != nil {
			return nil, err
		}
	}
}

// drain brings the tokens bucket down to at most to tokens: the upstream
// refused a call, or said it had that few left, so the bucket holds more
// than the upstream will accept. It reads the level, then takes the
// excess with an adjustment (two store calls: with a shared store, a take
// in between makes the drain deeper, never shallower). It is best effort:
// if the store fails, the pause and the slower rate still apply.
func (l *Limiter) drain(ctx context.Context, share, to float64) {
	limit := scale(l.tokens, share, 0)
	read := bucket.Request{Subject: l.subject, Charges: []bucket.Charge{{Bucket: TokensBucket, Limit: limit}}}
	d, err := l.takeOnce(ctx, read)
	if err != nil {
		return
	}
	excess := d.Buckets[0].Remaining - to
	if excess <= 0 {
		return
	}
	adjust := bucket.Request{Subject: l.subject, Mode: bucket.ModeAdjust, ID: l.newID(),
		Charges: []bucket.Charge{{Bucket: TokensBucket, Limit: limit, Cost: excess}}}
	for range resolveAttempts {
		// Resent with its ID after a lost reply, it is applied once.
		if _, err := l.takeOnce(ctx, adjust); !bucket.MayHaveApplied(err) {
			return
		}
	}
}

// request is the take of tokens (and a request) at share of the limits.
func (l *Limiter) request(id string, tokens, share float64) bucket.Request {
	charges := make([]bucket.Charge, 1, 2)
	charges[0] = bucket.Charge{Bucket: TokensBucket, Limit: scale(l.tokens, share, tokens), Cost: tokens}
	if r := l.cfg.requests; r != nil {
		charges = append(charges, bucket.Charge{Bucket: RequestsBucket, Limit: scale(*r, share, 1), Cost: 1})
	}
	return bucket.Request{Subject: l.subject, Charges: charges, ID: id}
}

// scale returns limit at share of its rate and capacity, the capacity never
// below cost, so that a slowed limiter still lets every call through.
func scale(limit bucket.Limit, share, cost float64) bucket.Limit {
	if share >= 1 {
		return limit
	}
	return bucket.Limit{
		Capacity:        math.Max(limit.Capacity*share, math.Min(cost, limit.Capacity)),
		RefillPerSecond: limit.RefillPerSecond * share,
	}
}

// takeOnce sends req, bounded by the store timeout but not by ctx: an
// abandoned take would have an unknown outcome to resolve.
func (l *Limiter) takeOnce(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.cfg.storeTimeout)
	defer cancel()
	return l.store.Take(ctx, req)
}

// resolve finds out whether the take req, whose reply was lost, was
// applied: it sends a zero adjustment with the same ID, which the store
// answers as a duplicate if the take was applied, and otherwise applies,
// recording the ID so that the lost take can never apply later.
func (l *Limiter) resolve(ctx context.Context, req bucket.Request) (applied bool, err error) {
	fence := req
	fence.Mode = bucket.ModeAdjust
	fence.Charges = make([]bucket.Charge, len(req.Charges))
	for i, c := range req.Charges {
		fence.Charges[i] = bucket.Charge{Bucket: c.Bucket, Limit: c.Limit}
	}
	for range resolveAttempts {
		d, e := l.takeOnce(ctx, fence)
		if e == nil {
			return d.Duplicate, nil
		}
		err = e
	}
	return false, err
}

func (l *Limiter) newID() string {
	return l.idPrefix + strconv.FormatUint(l.ids.Add(1), 10)
}

func (l *Limiter) freeSlot() {
	if l.slots != nil {
		<-l.slots
	}
}

// Done reports how the call went, adapting the limiter to what the
// upstream said (see [Limiter]), and frees the call's slot. Only the first
// Done of a permit counts; later ones, and Done on a nil permit, do
// nothing. It is safe for concurrent use.
func (p *Permit) Done(f Feedback) {
	if p == nil || !p.done.CompareAndSwap(false, true) {
		return
	}
	l := p.l
	l.inUse.Add(-1)
	l.freeSlot()
	now := l.cfg.clock.Now()
	s := f.signal(now)
	l.mu.Lock()
	cut := l.adapt.observe(now, p.epoch, s, l.aimd)
	share, until := l.adapt.shareAt(now, l.aimd), l.adapt.pausedUntil
	l.mu.Unlock()
	switch {
	case cut:
		l.cfg.logger.Info("outbound: upstream pushed back; slowing down", "upstream", l.name,
			"tokens_per_second", l.tokens.RefillPerSecond*share, "share", share, "paused_for", until.Sub(now).Round(time.Millisecond))
	case s.limited || s.pause > 0:
		l.cfg.logger.Debug("outbound: upstream asked for a pause", "upstream", l.name,
			"paused_for", until.Sub(now).Round(time.Millisecond))
	}
}

// Stats is a snapshot of a [Limiter]'s adaptation and load.
type Stats struct {
	// Share is the share of the configured rate allowed now: 1 unless
	// the upstream pushed back recently.
	Share float64
	// PausedUntil is when held calls may go again; in the past (or zero)
	// when calls are not held.
	PausedUntil time.Time
	// InFlight counts the permits granted and not yet done.
	InFlight int
	// Pushbacks counts the calls the upstream refused
	// ([Feedback.Limited]); Slowdowns the times the share was cut.
	Pushbacks, Slowdowns int64
}

// Stats returns the limiter's state now. It is safe for concurrent use.
func (l *Limiter) Stats() Stats {
	now := l.cfg.clock.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	return Stats{
		Share:       l.adapt.shareAt(now, l.aimd),
		PausedUntil: l.adapt.pausedUntil,
		InFlight:    int(l.inUse.Load()),
		Pushbacks:   l.adapt.pushbacks,
		Slowdowns:   l.adapt.slowdowns,
	}
}
