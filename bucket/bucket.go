// Package bucket holds the token-bucket model shared by every connectlimit
// [Store]: limits, requests, decisions and the pure arithmetic that turns a
// bucket's level, a cost and an instant into a [Decision].
//
// A bucket holds at most Capacity tokens and refills continuously at
// RefillPerSecond tokens per second. A call takes Cost tokens from each bucket
// it names, all or nothing. A bucket that has refilled to full is
// indistinguishable from one that was never used, so stores keep no state for
// it.
//
// A store call has three outcomes: applied, not applied, or unknown (the
// request was sent but its reply was lost, so it may have been applied).
// A [Store] says which with the decision it returns or with an error
// wrapping [ErrNotApplied] or [ErrOutcomeUnknown]; [MayHaveApplied] reads
// it. A [Request] may carry an ID, which makes it idempotent: a store that
// can lose replies applies at most one request per subject and ID within
// [Request.IDWindow], so that a caller may resend a request whose outcome
// is unknown without charging twice.
//
// A store that also implements [LeaseStore] limits concurrency: at most
// [LeaseRequest.Limit] leases of one subject and name are live at once,
// each expiring [LeaseRequest.TTL] after it was last acquired, so that the
// slots of a holder that died come back on their own.
//
// This package imports nothing but the standard library; the interceptor
// talks to stores only through [Store] and [LeaseStore], so it never knows
// whether the buckets live in memory or in Redis.
package bucket

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"
)

// MaxCharges is the largest number of buckets one [Request] may charge. It
// bounds the work a single call can ask of a store.
const MaxCharges = 16

// MaxIDBytes is the longest [Request.ID] or [LeaseRequest.ID], in bytes. It
// bounds the memory a store spends remembering IDs.
const MaxIDBytes = 128

// DefaultIDWindow is how long a store remembers the ID of a [Request] it
// applied when the request's IDWindow is zero: a request with the same
// subject and ID that arrives less than the window later (on the store's
// clock) is a duplicate and is not applied again; one that arrives later is
// applied as a new request. Callers that resend requests set IDWindow to
// cover their longest resend (the interceptor derives it from its settle
// retry duration); two minutes covers a one-minute retry with room to spare
// while keeping the memory remembered IDs cost small.
const DefaultIDWindow = 2 * time.Minute

// MaxIDWindow is the longest [Request.IDWindow]: one hour. Every remembered
// ID costs store memory for its whole window.
const MaxIDWindow = time.Hour

// MaxTokens is the largest capacity, refill rate or cost (in absolute value)
// a [Limit] or [Charge] may have: 1e15 tokens. Below it, token counts are
// exact to well under a token in a float64, and every count a header or a
// detail prints fits an int64.
const MaxTokens = 1e15

// tolerance absorbs floating-point noise when comparing a level with a cost,
// so that a caller who waits exactly RetryAfter is allowed.
const tolerance = 1e-9

// ErrInvalidRequest is wrapped by every error a [Store] returns for a
// malformed [Request] (as opposed to a backend failure). Such a request was
// not applied.
var ErrInvalidRequest = errors.New("bucket: invalid request")

// ErrNotApplied is wrapped by a [Store] error when the store is certain the
// request was not applied and never will be: it was never sent (the
// connection could not be made, the caller's context ended while it waited
// for its turn, a circuit breaker is open) or the backend refused it with an
// error before changing anything. The caller may resend it, or treat the
// call as uncharged.
var ErrNotApplied = errors.New("bucket: request not applied")

// ErrOutcomeUnknown is wrapped by a [Store] error when the request may have
// been applied: it was sent, and its reply was lost (a timeout, a dropped
// connection). Only a resend with the same [Request.ID] (which the store
// recognises as a duplicate if the first one was applied) tells which.
var ErrOutcomeUnknown = errors.New("bucket: request outcome unknown")

// ErrRejected is wrapped, with [ErrNotApplied], by a store error when the
// backend is healthy and answered, but could not apply this one request:
// for example, a key holds data the store cannot read. It says nothing of
// the store's health, so a circuit breaker does not count it.
var ErrRejected = errors.New("bucket: request rejected by the store")

// ErrUnavailable is wrapped, with [ErrNotApplied], by the errors of a store
// wrapper that refuses calls without trying the backend, such as an open
// circuit breaker.
var ErrUnavailable = errors.New("bucket: store unavailable")

// MayHaveApplied reports whether a failed store call may have changed the
// store: false for nil, for errors wrapping [ErrInvalidRequest] or
// [ErrNotApplied], and true for every other error, since a store that does
// not say otherwise may have lost the reply of a request it applied.
func MayHaveApplied(err error) bool {
	return err != nil && !errors.Is(err, ErrNotApplied) && !errors.Is(err, ErrInvalidRequest)
}

// Limit is the shape of one token bucket: how many tokens it holds when full
// and how fast it refills. The zero Limit is invalid; build one with
// [NewLimit] or check it with [Limit.Validate].
type Limit struct {
	// Capacity is the most tokens the bucket holds (its burst), > 0.
	Capacity float64
	// RefillPerSecond is the refill rate in tokens per second, > 0.
	RefillPerSecond float64
}

// NewLimit returns a validated Limit.
func NewLimit(capacity, refillPerSecond float64) (Limit, error) {
	l := Limit{Capacity: capacity, RefillPerSecond: refillPerSecond}
	if err := l.Validate(); err != nil {
		return Limit{}, err
	}
	return l, nil
}

// Validate reports whether l can be used: both fields must be greater than
// zero and at most [MaxTokens]. The error names the field and the value.
func (l Limit) Validate() error {
	if l.valid() {
		return nil
	}
	return l.invalid()
}

// valid reports whether Validate returns nil, cheaply enough to be inlined
// into the validation of every request.
func (l Limit) valid() bool {
	return l.Capacity > 0 && l.Capacity <= MaxTokens && l.RefillPerSecond > 0 && l.RefillPerSecond <= MaxTokens
}

// invalid returns the error of a Limit that is not valid.
func (l Limit) invalid() error {
	if err := positiveBounded("capacity", l.Capacity); err != nil {
		return err
	}
	return positiveBounded("refill_per_second", l.RefillPerSecond)
}

func positiveBounded(field string, v float64) error {
	if !(v > 0 && v <= MaxTokens) {
		return fmt.Errorf("bucket: %s must be greater than 0 and at most %g, got %v", field, MaxTokens, v)
	}
	return nil
}

// Refill returns the level of a bucket that held tokens elapsed ago: tokens
// plus the refill since then, capped at Capacity. A negative elapsed time
// (a clock that stepped back) refills nothing.
func (l Limit) Refill(tokens float64, elapsed time.Duration) float64 {
	if elapsed > 0 {
		tokens += elapsed.Seconds() * l.RefillPerSecond
	}
	return min(tokens, l.Capacity)
}

// TimeToFull is how long a bucket holding tokens takes to refill to
// Capacity, rounded up to the nanosecond. It is zero for a full bucket.
func (l Limit) TimeToFull(tokens float64) time.Duration {
	return l.timeToReach(tokens, l.Capacity)
}

// timeToReach is how long a bucket holding tokens takes to hold want tokens,
// rounded up so that waiting exactly that long is enough.
func (l Limit) timeToReach(tokens, want float64) time.Duration {
	if tokens >= want {
		return 0
	}
	return secondsCeil((want - tokens) / l.RefillPerSecond)
}

// RetryAfter is how long a bucket holding tokens takes to afford cost,
// rounded up to the nanosecond: zero if it already can. It is what
// [Decide] reports as a denied bucket's [BucketState.RetryAfter] when cost
// is at most Capacity (no wait helps a larger cost). A store refills a
// bucket from its stored level, and for a deep debt that sum rounds by
// more than the tolerance of the comparison with the cost (about 1e-16 of
// the debt): the wait then covers the rounding too, so that waiting
// exactly RetryAfter is always enough.
func (l Limit) RetryAfter(tokens, cost float64) time.Duration {
	if tokens >= cost {
		return 0
	}
	deficit := cost - tokens
	if noise := deficit * refillNoise; noise > tolerance*max(1, cost) {
		deficit += noise
	}
	return secondsCeil(deficit / l.RefillPerSecond)
}

// refillNoise bounds the relative rounding of a refill, a few ulps.
const refillNoise = 1e-15

func secondsCeil(s float64) time.Duration {
	ns := math.Ceil(s * 1e9)
	if ns >= math.MaxInt64 {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(ns)
}

// Mode says how a [Store] applies a [Request].
type Mode uint8

const (
	// ModeTake charges every bucket only if every bucket can pay its cost;
	// otherwise it changes nothing and denies. A zero cost reads the buckets
	// without changing them. This is the default.
	ModeTake Mode = iota
	// ModeAdjust always applies the costs: a positive cost may take a bucket
	// below zero (a debt that later refill pays off), and a negative cost
	// returns tokens, never above Capacity. It is used to settle a call's
	// estimated cost to its actual cost.
	ModeAdjust
)

// String returns the mode's name.
func (m Mode) String() string {
	switch m {
	case ModeTake:
		return "take"
	case ModeAdjust:
		return "adjust"
	default:
		return fmt.Sprintf("Mode(%d)", uint8(m))
	}
}

// Charge is one bucket of a [Request] and what the request costs it.
type Charge struct {
	// Bucket names the bucket, e.g. "search". Together with the request's
	// Subject it identifies one bucket instance.
	Bucket string
	// Limit is the bucket's capacity and refill rate.
	Limit Limit
	// Cost is the number of tokens to take; fractions are allowed. It must
	// be >= 0 with ModeTake and may be negative (a refund) with ModeAdjust.
	Cost float64
}

// Apply returns the level of a bucket holding tokens once c is applied to
// it in mode, and whether c can be applied: with [ModeAdjust] always (the
// level may go below zero, and never above Capacity); with [ModeTake] only
// if the cost is at most Capacity and tokens cover it (up to floating-point
// noise), and otherwise the level stays tokens. It is how [Decide] judges
// each bucket, for stores that must apply a decision before they build it.
func (c Charge) Apply(mode Mode, tokens float64) (remaining float64, ok bool) {
	switch {
	case mode == ModeAdjust:
		return min(tokens-c.Cost, c.Limit.Capacity), true
	case c.Cost > c.Limit.Capacity:
		return tokens, false
	case tokens-c.Cost >= -tolerance*max(1, c.Cost):
		return tokens - c.Cost, true
	default:
		return tokens, false
	}
}

// Request asks a [Store] to charge some of one subject's buckets at once.
// Every bucket of a request belongs to the same subject, which is what lets a
// Redis Cluster store keep them in one hash slot.
type Request struct {
	// Subject is who pays: an API key, a user or a client address, already
	// made unique by the caller (e.g. "user:alice"). Any non-empty string
	// is accepted; stores escape or hash it.
	Subject string
	// Charges are the buckets to charge, at most [MaxCharges], each bucket
	// name at most once.
	Charges []Charge
	// Mode says how the charges are applied; the zero value is [ModeTake].
	Mode Mode
	// ID, when set, makes the request idempotent: a store that can lose
	// replies applies at most one request per (Subject, ID) within
	// IDWindow. A repeat of an applied request is not applied again; it
	// returns Allowed true with Duplicate true and the buckets' current
	// levels, as a zero-cost read would (see [DecideDuplicate]). The store
	// compares only Subject and ID, not the charges or the mode, so a
	// repeat may differ: resending a ModeTake request whose outcome was
	// unknown as a ModeAdjust request with the same ID charges it exactly
	// once, whether or not the first one was applied. An ID is recorded
	// only when its request is applied: a denied ModeTake records nothing,
	// and may be retried with the same ID.
	//
	// The empty ID (the default) turns idempotency off. An ID is at most
	// [MaxIDBytes] bytes of any value; stores escape or hash it. A store
	// that never loses a reply (see [InProcess]) need not remember IDs at
	// all: a caller only resends a request after an unknown outcome.
	ID string
	// IDWindow is how long the store remembers ID once the request is
	// applied, on its own clock; zero means [DefaultIDWindow]. It must be at
	// most [MaxIDWindow], and should exceed the longest time after which
	// the caller may resend the request.
	IDWindow time.Duration
	// Into, when its capacity is at least len(Charges), is the array that
	// the decision's Buckets are written to, instead of a new one: a
	// caller that decides one request at a time can reuse one array and
	// decide without allocating. The decision's Buckets then share Into's
	// array, so the caller must be done with a decision before it sends
	// the same array again. Into's length and contents are ignored. Nil,
	// the default, allocates.
	Into []BucketState
}

// Window returns the request's ID window: IDWindow, or [DefaultIDWindow]
// when it is zero.
func (r Request) Window() time.Duration {
	if r.IDWindow == 0 {
		return DefaultIDWindow
	}
	return r.IDWindow
}

// Validate reports whether r is well formed. The error wraps
// [ErrInvalidRequest] and names the offending field and value.
func (r Request) Validate() error {
	if r.Subject == "" {
		return fmt.Errorf("%w: subject is empty", ErrInvalidRequest)
	}
	if r.Mode != ModeTake && r.Mode != ModeAdjust {
		return fmt.Errorf("%w: unknown mode %v", ErrInvalidRequest, r.Mode)
	}
	if len(r.ID) > MaxIDBytes {
		return fmt.Errorf("%w: id is %d bytes, want at most %d", ErrInvalidRequest, len(r.ID), MaxIDBytes)
	}
	if r.IDWindow < 0 || r.IDWindow > MaxIDWindow {
		return fmt.Errorf("%w: id window must be between 0 and %v, got %v", ErrInvalidRequest, MaxIDWindow, r.IDWindow)
	}
	if len(r.Charges) == 0 || len(r.Charges) > MaxCharges {
		return fmt.Errorf("%w: %d charges, want 1 to %d", ErrInvalidRequest, len(r.Charges), MaxCharges)
	}
	// By index, not by value: a Charge is 48 bytes, and every store
	// validates every request it is sent.
	for i := range r.Charges {
		c := &r.Charges[i]
		if c.Bucket == "" {
			return fmt.Errorf("%w: charges[%d].bucket is empty", ErrInvalidRequest, i)
		}
		for j := range i {
			if r.Charges[j].Bucket == c.Bucket {
				return fmt.Errorf("%w: bucket %q is charged twice", ErrInvalidRequest, c.Bucket)
			}
		}
		if !c.Limit.valid() {
			return fmt.Errorf("%w: bucket %q: %w", ErrInvalidRequest, c.Bucket, c.Limit.invalid())
		}
		switch {
		case r.Mode == ModeTake && !(c.Cost >= 0 && c.Cost <= MaxTokens):
			return fmt.Errorf("%w: bucket %q: cost must be between 0 and %g, got %v", ErrInvalidRequest, c.Bucket, MaxTokens, c.Cost)
		case r.Mode == ModeAdjust && !(c.Cost >= -MaxTokens && c.Cost <= MaxTokens):
			return fmt.Errorf("%w: bucket %q: adjustment must be between %g and %g, got %v", ErrInvalidRequest, c.Bucket, -MaxTokens, MaxTokens, c.Cost)
		}
	}
	return nil
}

// Decision is a [Store]'s answer to a [Request]. A denial is a Decision with
// Allowed false, never an error.
//
// For example, a bucket with Capacity 10 and RefillPerSecond 1 that holds 2
// tokens, asked for 5, denies with Remaining 2, RetryAfter 3s (when it will
// hold 5) and ResetAfter 8s (when it will be full).
type Decision struct {
	// Allowed reports whether the request was applied, now or (for a
	// Duplicate) earlier. With ModeTake it is true only if every bucket
	// could pay; with ModeAdjust it is always true.
	Allowed bool
	// Duplicate reports that the request's [Request.ID] was already applied
	// within [IdempotencyWindow], so this request changed nothing. Allowed
	// is then true, and Buckets hold the current levels.
	Duplicate bool
	// RetryAfter is, for a denied request, how long until every bucket can
	// pay its cost, assuming nobody else takes from them. It is zero when
	// the request was allowed, and also when it can never be allowed
	// because a cost exceeds its bucket's capacity (see [Decision.OverCapacity]).
	// It is exact up to the float64 rounding of a store's refill from the
	// level it stored, a few 1e-16 of that level: waiting it is always
	// enough unless a bucket carries a debt of billions of its capacity, when
	// a retry may come a few nanoseconds early.
	RetryAfter time.Duration
	// Buckets has one entry for each charge of the request, in order.
	Buckets []BucketState
}

// BucketState is one bucket's part of a [Decision].
type BucketState struct {
	// Bucket is the bucket's name, as in the [Charge].
	Bucket string
	// Limit is the bucket's limit, as in the [Charge].
	Limit Limit
	// Cost is the cost that was asked of the bucket.
	Cost float64
	// Allowed reports whether this bucket alone could pay Cost. A request
	// can be denied while some of its buckets report Allowed.
	Allowed bool
	// Remaining is the bucket's level once the decision is applied (or
	// now, if the request was denied). It is negative when the bucket is in
	// debt after a ModeAdjust charge.
	Remaining float64
	// RetryAfter is how long until this bucket alone can pay Cost: zero if
	// it can now, or if it never can (Cost > Capacity).
	RetryAfter time.Duration
	// ResetAfter is how long until the bucket is full again.
	ResetAfter time.Duration
}

// OverCapacity reports whether the cost exceeds the bucket's capacity, so
// that no wait can make it affordable.
func (b BucketState) OverCapacity() bool { return b.Cost > b.Limit.Capacity }

// OverCapacity reports whether a denial is final: some bucket was asked for
// more than it can ever hold.
func (d Decision) OverCapacity() bool {
	for _, b := range d.Buckets {
		if b.OverCapacity() {
			return true
		}
	}
	return false
}

// Denying returns the bucket that denied the request: among the buckets that
// could not pay, the one with a cost over its capacity if any, else the one
// with the longest wait. It returns false for an allowed request.
func (d Decision) Denying() (BucketState, bool) {
	var worst BucketState
	found := false
	for _, b := range d.Buckets {
		if b.Allowed {
			continue
		}
		switch {
		case !found:
			worst, found = b, true
		case b.OverCapacity() && !worst.OverCapacity():
			worst = b
		case !worst.OverCapacity() && b.RetryAfter > worst.RetryAfter:
			worst = b
		}
	}
	return worst, found
}

// buckets returns the slice a decision of r fills: Into's array if it is
// large enough, else a new one.
func (r Request) buckets() []BucketState {
	n := len(r.Charges)
	if cap(r.Into) >= n {
		return r.Into[:n]
	}
	return make([]BucketState, n)
}

// Decide is the token-bucket arithmetic every store shares. Given a valid
// request and the current level of each of its buckets (tokens[i] for
// Charges[i], already refilled to the present with [Limit.Refill]), it
// returns the decision; if it is allowed, each bucket's Remaining is the
// level to store. It does not read a clock, and it does not modify tokens.
// Its Buckets are written to req.Into when that is large enough (see
// [Request.Into]).
func Decide(req Request, tokens []float64) Decision {
	if len(req.Charges) == 1 {
		return decideOne(&req, tokens[0])
	}
	d := Decision{Allowed: true, Buckets: req.buckets()}
	for i, c := range req.Charges {
		b := &d.Buckets[i]
		*b = BucketState{Bucket: c.Bucket, Limit: c.Limit, Cost: c.Cost}
		b.Remaining, b.Allowed = c.Apply(req.Mode, tokens[i])
		if !b.Allowed {
			d.Allowed = false
			// A cost over capacity gets no RetryAfter, since no wait would
			// help.
			if c.Cost <= c.Limit.Capacity {
				b.RetryAfter = c.Limit.RetryAfter(tokens[i], c.Cost)
			}
		}
	}
	for i := range d.Buckets {
		b := &d.Buckets[i]
		if !d.Allowed {
			b.Remaining = tokens[i]
		}
		b.ResetAfter = b.Limit.TimeToFull(b.Remaining)
	}
	if !d.Allowed && !d.OverCapacity() {
		for _, b := range d.Buckets {
			d.RetryAfter = max(d.RetryAfter, b.RetryAfter)
		}
	}
	return d
}

// decideOne is [Decide] for the most common request, of one charge,
// without its loops: a memstore denies a hot caller through it.
func decideOne(req *Request, tokens float64) Decision {
	c := &req.Charges[0]
	remaining, ok := c.Apply(req.Mode, tokens)
	var retryAfter time.Duration
	if !ok {
		remaining = tokens
		if c.Cost <= c.Limit.Capacity {
			retryAfter = c.Limit.RetryAfter(tokens, c.Cost)
		}
	}
	// The state is built whole and stored once: a hot caller's denials
	// come through here, and storing field by field into the (heap)
	// buckets costs a write barrier check each.
	d := Decision{Allowed: ok, RetryAfter: retryAfter, Buckets: req.buckets()}
	d.Buckets[0] = BucketState{
		Bucket: c.Bucket, Limit: c.Limit, Cost: c.Cost, Allowed: ok,
		Remaining: remaining, RetryAfter: retryAfter, ResetAfter: c.Limit.TimeToFull(remaining),
	}
	return d
}

// DecideDuplicate is the decision for a repeat of an applied request (see
// [Request.ID]): given the current level of each of its buckets, as for
// [Decide], it returns an allowed Decision with Duplicate set, in which
// each bucket reports the request's Cost but is charged nothing: Remaining
// is the current level and ResetAfter the time until full, as a zero-cost
// read would report them. Unlike such a read, every bucket reports Allowed,
// even one in debt, since the request was applied when it was first made.
// It does not read a clock, and it does not modify tokens. Like [Decide],
// it writes Buckets to req.Into when that is large enough.
func DecideDuplicate(req Request, tokens []float64) Decision {
	d := Decision{Allowed: true, Duplicate: true, Buckets: req.buckets()}
	for i, c := range req.Charges {
		d.Buckets[i] = BucketState{
			Bucket:     c.Bucket,
			Limit:      c.Limit,
			Cost:       c.Cost,
			Allowed:    true,
			Remaining:  tokens[i],
			ResetAfter: c.Limit.TimeToFull(tokens[i]),
		}
	}
	return d
}

// Store decides [Request]s against buckets it keeps. Implementations are
// safe for concurrent use, apply each request atomically (all of its
// charges or none, and its [Request.ID] with them), and decide with their
// own notion of the present (an injected clock in memory, the server's
// clock in Redis), which also times [Request.IDWindow].
//
// Take returns an error only when the request is malformed (wrapping
// [ErrInvalidRequest]) or the backend failed; a denial is a [Decision]
// with Allowed false. A backend failure wraps [ErrNotApplied] when the
// store is sure nothing was changed, and [ErrOutcomeUnknown] when the
// request may have been applied (a lost reply); an error that wraps
// neither is treated as unknown (see [MayHaveApplied]). A caller resolves
// an unknown outcome by resending the request with the same ID.
type Store interface {
	Take(ctx context.Context, req Request) (Decision, error)
}

// InProcess is implemented by stores that keep their state in this
// process's memory, such as memstore. Their calls never lose a reply: they
// fail only before changing anything (an invalid request, a context already
// done), so their outcomes are never unknown, they need no fallback while
// "the store is down", and they need not remember request IDs. Wrappers
// forward the answer of the store they wrap.
type InProcess interface {
	Store
	// InProcess reports whether the store keeps its state in this
	// process.
	InProcess() bool
}

// IsInProcess reports whether s keeps its state in this process (see
// [InProcess]).
func IsInProcess(s Store) bool {
	ip, ok := s.(InProcess)
	return ok && ip.InProcess()
}

// LeaseRequest asks a [LeaseStore] for one of Limit concurrent slots of a
// subject's named concurrency limit.
type LeaseRequest struct {
	// Subject is who holds the lease, by the rules of [Request.Subject]:
	// any non-empty string.
	Subject string
	// Name is the concurrency limit's name, e.g. "generate_streams": any
	// non-empty string. Leases of different names never share slots, and
	// a lease named like a bucket is unrelated to it.
	Name string
	// Limit is how many leases of (Subject, Name) may be live at once,
	// >= 1. It is read at each Acquire, so it can change between calls: a
	// smaller Limit denies new leases until enough holders release, but
	// never revokes a live lease, and its holder may still renew it.
	Limit int
	// ID names this lease, unique per call: 1 to [MaxIDBytes] bytes of any
	// value. Acquiring with the ID of a live lease of (Subject, Name)
	// renews it; its holder then still holds one slot, not two.
	ID string
	// TTL is how long the lease lives after it was acquired or last
	// renewed, > 0: a holder that dies without releasing frees its slot
	// TTL later. Stores may round it up to a microsecond.
	TTL time.Duration
}

// Validate reports whether r is well formed. The error wraps
// [ErrInvalidRequest] and names the offending field and value.
func (r LeaseRequest) Validate() error {
	if err := ValidateLease(r.Subject, r.Name, r.ID); err != nil {
		return err
	}
	if r.Limit < 1 {
		return fmt.Errorf("%w: lease limit must be at least 1, got %d", ErrInvalidRequest, r.Limit)
	}
	if r.TTL <= 0 {
		return fmt.Errorf("%w: lease ttl must be greater than 0, got %v", ErrInvalidRequest, r.TTL)
	}
	return nil
}

// ValidateLease reports whether subject, name and id can name a lease, by
// the rules of [LeaseRequest]. Stores check the arguments of
// [LeaseStore.Release] with it. The error wraps [ErrInvalidRequest] and
// names the offending field and value.
func ValidateLease(subject, name, id string) error {
	switch {
	case subject == "":
		return fmt.Errorf("%w: lease subject is empty", ErrInvalidRequest)
	case name == "":
		return fmt.Errorf("%w: lease name is empty", ErrInvalidRequest)
	case id == "":
		return fmt.Errorf("%w: lease id is empty", ErrInvalidRequest)
	case len(id) > MaxIDBytes:
		return fmt.Errorf("%w: lease id is %d bytes, want 1 to %d", ErrInvalidRequest, len(id), MaxIDBytes)
	}
	return nil
}

// LeaseDecision is a [LeaseStore]'s answer to a [LeaseRequest]. A denial is
// a LeaseDecision with Acquired false, never an error.
type LeaseDecision struct {
	// Acquired reports whether the caller holds the lease, newly acquired
	// or renewed, until it releases it or TTL passes without a renewal.
	Acquired bool
	// InUse is how many leases of (Subject, Name) are live after the
	// decision, this one included if acquired. Expired leases never count.
	// It may exceed Limit after Limit was lowered.
	InUse int
	// Limit is the request's Limit.
	Limit int
}

// LeaseStore is implemented by stores that can also limit concurrency: at
// most [LeaseRequest.Limit] live leases per subject and name, shared by
// every process that uses the same backend, each expiring unless renewed.
// Implementations are safe for concurrent use, decide each call atomically,
// and read the present from the same clock as their [Store.Take].
//
// Acquire and Release return an error only when the request is malformed
// (wrapping [ErrInvalidRequest]) or the backend failed, wrapping
// [ErrNotApplied] or [ErrOutcomeUnknown] as [Store.Take] does; a denial is
// a [LeaseDecision] with Acquired false. Acquire is idempotent while the
// lease is live (a repeat renews it), so a caller may resend it after a lost
// reply; it should Release the ID if it gives up, since a lost reply may
// hide an acquired lease. Release is idempotent.
type LeaseStore interface {
	// Acquire acquires or renews the lease req.ID of (req.Subject,
	// req.Name) if it is live or a slot is free, and reports how many
	// leases are live. Renewing a lease that has expired is acquiring it
	// anew: it fails if its slot was taken meanwhile.
	Acquire(ctx context.Context, req LeaseRequest) (LeaseDecision, error)
	// Release ends the lease id of (subject, name), freeing its slot.
	// Releasing an unknown or expired lease is not an error.
	Release(ctx context.Context, subject, name, id string) error
}
