// Package breaker is a circuit breaker around a [bucket.Store]: after a run
// of store failures it answers every call at once, without trying the
// store, until a background probe finds the store working again.
//
// A dead store (Redis unreachable, a partition, a full connection pool
// that never drains) fails each call only when the call's timeout runs
// out, so without a breaker every request pays that timeout before the
// interceptor's failure policy applies. A [Breaker] lets [WithThreshold]
// consecutive calls pay it; then it opens, and every call fails in
// nanoseconds with an error that wraps [bucket.ErrNotApplied] and
// [bucket.ErrUnavailable]. While open, one goroutine probes the store every
// [WithProbeInterval] with a zero-cost read; the first probe that succeeds
// closes the Breaker, and the goroutine exits. No goroutine runs while the
// Breaker is closed, and none after [Breaker.Close].
//
// # What counts as a failure
//
// A slow store is not a dead one. A call's error counts as a store failure
// unless:
//
//   - it wraps [bucket.ErrInvalidRequest]: the request was malformed, and
//     the store was not at fault;
//   - it wraps [bucket.ErrRejected]: the store answered, healthy, and
//     refused this one request;
//   - the caller's context was canceled (its error is [context.Canceled]):
//     the caller went away, and whatever the store did says nothing of its
//     health;
//   - it wraps [bucket.ErrNotApplied] and the caller's context is done: the
//     call was abandoned in the store's queue (waiting for a pooled
//     connection, say) because the caller ran out of time, so the store was
//     busy, not broken.
//
// Every other error counts, notably a timeout after the request was sent
// ([bucket.ErrOutcomeUnknown] with an expired deadline) and a refused
// connection ([bucket.ErrNotApplied] with the caller's context still live).
// A call that returns no error, allowed or denied, resets the count; an
// error that does not count leaves it unchanged.
//
// "Consecutive" is over calls that did not overlap: of the calls in flight
// together, only the first failure counts, and a call that started before
// the last counted failure does not count again. A store that coalesces
// calls (redisstore) fails every call of a batch at once, and one slow
// batch is one failure, however many callers it carried.
package breaker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// ProbeSubject is the subject of the open Breaker's probe: a [bucket.Store.Take]
// of bucket "probe" with Capacity 1, RefillPerSecond 1 and Cost 0, which
// reads a bucket that does not exist and so changes nothing.
const ProbeSubject = "connectlimit~probe"

// probeRequest is the probe's zero-cost read.
var probeRequest = bucket.Request{
	Subject: ProbeSubject,
	Charges: []bucket.Charge{{Bucket: "probe", Limit: bucket.Limit{Capacity: 1, RefillPerSecond: 1}}},
}

var (
	_ bucket.Store      = (*Breaker)(nil)
	_ bucket.LeaseStore = (*Breaker)(nil)
	_ bucket.InProcess  = (*Breaker)(nil)
)

// State is whether a [Breaker] passes calls to its store.
type State int32

const (
	// StateClosed passes every call to the store. It is the initial
	// state.
	StateClosed State = iota
	// StateOpen answers every call with an error, without trying the
	// store, while a background probe waits for the store to recover.
	StateOpen
)

// String returns "closed" or "open".
func (s State) String() string {
	switch s {
	case StateClosed:
		return "closed"
	case StateOpen:
		return "open"
	default:
		return fmt.Sprintf("State(%d)", int32(s))
	}
}

// Breaker is a [bucket.Store] and [bucket.LeaseStore] that wraps another
// store and stops calling it while it is failing; see the package
// documentation. Build one with [New] and stop its probe with
// [Breaker.Close]. It is safe for concurrent use; while closed, a call
// costs the Breaker one atomic load on the way in and, unless a failure
// preceded it, one on the way out.
type Breaker struct {
	store    bucket.Store
	leases   bucket.LeaseStore // nil if store is not a bucket.LeaseStore
	noLeases error
	cfg      config

	state atomic.Int32
	// failures counts consecutive counted failures while closed.
	failures atomic.Int64
	// epoch counts the failures counted so far; a call notes it when it
	// starts, and its failure counts only if no failure was counted
	// meanwhile.
	epoch atomic.Int64
	// rejection is the error of calls refused while open. It is stored
	// before the state changes to open.
	rejection atomic.Pointer[openError]

	opens, closes, rejected, failed atomic.Uint64

	// mu serializes changes of state, the hook calls that report them,
	// and the start and stop of the probe.
	mu sync.Mutex
	// cause is the failure that last opened the Breaker.
	cause error
	// stopProbe cancels the running probe, if any.
	stopProbe context.CancelFunc
	// shut is set by Close: the Breaker then never probes again.
	shut bool
	wg   sync.WaitGroup
}

// New returns a closed Breaker around store, which is required. The
// Breaker forwards [bucket.LeaseStore] calls when store implements it, and
// answers [bucket.InProcess] as store does. It starts no goroutine until it
// first opens.
//
// A Breaker always has Acquire and Release methods, so it always satisfies
// [bucket.LeaseStore]; when store does not, they fail with an error
// wrapping [errors.ErrUnsupported] and [bucket.ErrNotApplied]. Wrap a
// store that is not a LeaseStore only where no concurrency limits are
// configured.
func New(store bucket.Store, opts ...Option) *Breaker {
	b := &Breaker{
		store: store,
		cfg:   config{threshold: DefaultThreshold, interval: DefaultProbeInterval},
	}
	for _, o := range opts {
		o.apply(&b.cfg)
	}
	b.leases, _ = store.(bucket.LeaseStore)
	if b.leases == nil {
		b.noLeases = fmt.Errorf("breaker: the wrapped store %T is not a bucket.LeaseStore: %w: %w", store, errors.ErrUnsupported, bucket.ErrNotApplied)
	}
	return b
}

// openError is the error of a call an open Breaker refused.
type openError struct{ msg string }

// Error returns the message naming the failure that opened the Breaker.
func (e *openError) Error() string { return e.msg }

// Is reports that the call was not applied because the store is
// unavailable. The failure that opened the Breaker is named in the message
// but not wrapped: it may say the outcome was unknown, and this call's is
// not.
func (e *openError) Is(target error) bool {
	return target == bucket.ErrNotApplied || target == bucket.ErrUnavailable
}

// Take implements [bucket.Store]. While the Breaker is closed it returns
// what the wrapped store returns. While it is open it returns at once,
// without calling the store, an error wrapping [bucket.ErrNotApplied] and
// [bucket.ErrUnavailable] that names the failure that opened it.
func (b *Breaker) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if err := b.refuse(); err != nil {
		return bucket.Decision{}, err
	}
	started := b.epoch.Load()
	d, err := b.store.Take(ctx, req)
	b.record(ctx, err, started)
	return d, err
}

// Acquire implements [bucket.LeaseStore] as [Breaker.Take] implements
// [bucket.Store]. It fails with an error wrapping [errors.ErrUnsupported]
// and [bucket.ErrNotApplied] if the wrapped store is not a
// [bucket.LeaseStore].
func (b *Breaker) Acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	if b.leases == nil {
		return bucket.LeaseDecision{}, b.noLeases
	}
	if err := b.refuse(); err != nil {
		return bucket.LeaseDecision{}, err
	}
	started := b.epoch.Load()
	d, err := b.leases.Acquire(ctx, req)
	b.record(ctx, err, started)
	return d, err
}

// Release implements [bucket.LeaseStore] as [Breaker.Acquire] does. A
// release refused while open leaves the lease to expire at its TTL.
func (b *Breaker) Release(ctx context.Context, subject, name, id string) error {
	if b.leases == nil {
		return b.noLeases
	}
	if err := b.refuse(); err != nil {
		return err
	}
	started := b.epoch.Load()
	err := b.leases.Release(ctx, subject, name, id)
	b.record(ctx, err, started)
	return err
}

// InProcess implements [bucket.InProcess]: it reports whether the wrapped
// store keeps its state in this process (see [bucket.IsInProcess]).
func (b *Breaker) InProcess() bool { return bucket.IsInProcess(b.store) }

// refuse returns the error of a call refused because the Breaker is open,
// or nil if it is closed.
func (b *Breaker) refuse() error {
	if State(b.state.Load()) == StateClosed {
		return nil
	}
	if e := b.rejection.Load(); e != nil {
		b.rejected.Add(1)
		return e
	}
	return nil
}

// record counts the outcome of a call, started at epoch started, that the
// store answered with err, and opens the Breaker after Threshold
// consecutive failures.
func (b *Breaker) record(ctx context.Context, err error, started int64) {
	if err == nil {
		if b.failures.Load() != 0 {
			b.failures.Store(0)
		}
		return
	}
	if !isFailure(ctx, err) {
		return
	}
	b.failed.Add(1)
	// Calls in flight together fail together, of one cause (a store that
	// coalesces calls fails a whole batch at once): only the first failure
	// among the calls that started before it counts, or one slow batch of
	// many callers would open the Breaker.
	if !b.epoch.CompareAndSwap(started, started+1) {
		return
	}
	if b.failures.Add(1) >= int64(b.cfg.threshold) && State(b.state.Load()) == StateClosed {
		b.open(err)
	}
}

// isFailure reports whether err, returned by a call made with ctx, says
// the store is failing; see the package documentation.
func isFailure(ctx context.Context, err error) bool {
	switch {
	case errors.Is(err, bucket.ErrInvalidRequest), errors.Is(err, bucket.ErrRejected):
		return false
	case errors.Is(ctx.Err(), context.Canceled):
		return false
	case errors.Is(err, bucket.ErrNotApplied) && ctx.Err() != nil:
		return false
	}
	return true
}

// open opens the Breaker because of cause, and starts the probe unless
// Close was called.
func (b *Breaker) open(cause error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if State(b.state.Load()) == StateOpen {
		return
	}
	b.cause = cause
	b.rejection.Store(&openError{msg: fmt.Sprintf(
		"breaker: open after %d consecutive store failures, so the store was not tried; the last failure: %v", b.cfg.threshold, cause)})
	b.state.Store(int32(StateOpen))
	b.opens.Add(1)
	if !b.shut {
		ctx, cancel := context.WithCancel(context.Background())
		b.stopProbe = cancel
		b.wg.Add(1)
		go b.probe(ctx)
	}
	b.report(StateOpen)
}

// report calls the state hook, if any. The caller holds b.mu.
func (b *Breaker) report(s State) {
	if b.cfg.hook != nil {
		b.cfg.hook(s, b.cause)
	}
}

// probe reads the store every probe interval until a read succeeds, then
// closes the Breaker; it returns early when ctx is canceled.
func (b *Breaker) probe(ctx context.Context) {
	defer b.wg.Done()
	t := time.NewTicker(b.cfg.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, b.cfg.interval)
		_, err := b.store.Take(pctx, probeRequest)
		cancel()
		if err != nil {
			continue
		}
		b.mu.Lock()
		// Close may have stopped the probe while it read the store.
		if ctx.Err() == nil {
			b.stopProbe()
			b.stopProbe = nil
			b.failures.Store(0)
			b.state.Store(int32(StateClosed))
			b.closes.Add(1)
			b.report(StateClosed)
		}
		b.mu.Unlock()
		return
	}
}

// Close stops the probe, if one is running, and waits for it to return. It
// does not close the wrapped store. Close is idempotent and always returns
// nil.
//
// The Breaker keeps working after Close, except that it never probes
// again: a closed Breaker still passes calls to the store and still opens
// after Threshold failures, but an open one stays open for good, refusing
// every call. Close it when done with it, such as when the server shuts
// down.
func (b *Breaker) Close() error {
	b.mu.Lock()
	b.shut = true
	if b.stopProbe != nil {
		b.stopProbe()
		b.stopProbe = nil
	}
	b.mu.Unlock()
	b.wg.Wait()
	return nil
}

// State returns the Breaker's current state. It is safe for concurrent
// use.
func (b *Breaker) State() State { return State(b.state.Load()) }

// Stats counts what a [Breaker] has done since it was made.
type Stats struct {
	// Opens counts changes from [StateClosed] to [StateOpen].
	Opens uint64
	// Closes counts changes from [StateOpen] to [StateClosed], each made
	// by a probe that succeeded.
	Closes uint64
	// Rejected counts calls answered while open, without trying the store.
	Rejected uint64
	// Failures counts calls whose error counted as a store failure (see
	// the package documentation), whether or not it opened the Breaker.
	// Failed probes are not counted.
	Failures uint64
}

// Stats returns the Breaker's counters. Each is read atomically, but not
// all at one instant. It is safe for concurrent use.
func (b *Breaker) Stats() Stats {
	return Stats{
		Opens:    b.opens.Load(),
		Closes:   b.closes.Load(),
		Rejected: b.rejected.Load(),
		Failures: b.failed.Load(),
	}
}
