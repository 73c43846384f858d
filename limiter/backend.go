package limiter

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/breaker"
	"github.com/connectlimit/connectlimit/bucket/denycache"
)

// backend is where a call's buckets live: the store (unless it is
// in-process, behind a circuit breaker, a deadline and the denial cache, in
// that order from the store out) and the local store that decides under
// FailLocal while the store is failing. It counts what failed.
type backend struct {
	main        bucket.Store
	leases      bucket.LeaseStore // the store's leases; nil if it cannot limit concurrency
	breaker     *breaker.Breaker  // nil for an in-process store, which never fails
	denials     *denycache.Store  // nil for an in-process store, or WithDenialCache(false)
	bounded     bool              // main bounds each store call by wait itself
	local       bucket.Store      // nil without WithLocalStore
	localLeases bucket.LeaseStore // the local store's leases; nil if it has none
	share       float64
	// wait bounds each store call: the store timeout plus the time a call
	// may wait for its turn.
	wait time.Duration
	log  *failureLog

	allowedWithoutStore atomic.Uint64
	localDecisions      atomic.Uint64
	rejectedUnavailable atomic.Uint64
	unknownOutcomes     atomic.Uint64
	storeFailures       atomic.Uint64
}

func newBackend(store bucket.Store, cfg config) *backend {
	b := &backend{
		main:  store,
		local: cfg.local,
		share: cfg.localShare,
		wait:  cfg.timeout + StoreQueueWait,
		log:   newFailureLog(cfg.logger, cfg.logEvery),
	}
	if !bucket.IsInProcess(store) {
		b.breaker = breaker.New(store, breaker.WithStateHook(b.log.breakerChanged))
		b.main = b.breaker
		if !cfg.noDenyCache {
			// The cache sits outside the breaker, so that it keeps
			// denying while the breaker is open, and its local denials
			// never count as the store's successes. The deadline sits
			// inside it, so that a local denial costs no timer.
			b.denials = denycache.New(deadline{b.breaker, b.wait})
			b.main, b.bounded = b.denials, true
		}
	}
	if ls, ok := store.(bucket.LeaseStore); ok {
		b.leases = ls
		if b.breaker != nil {
			b.leases = b.breaker
		}
	}
	b.localLeases, _ = cfg.local.(bucket.LeaseStore)
	return b
}

// take asks the store, bounded by the wait. An in-process store (no
// breaker) answers at once, and needs no deadline.
func (b *backend) take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if b.breaker == nil || b.bounded {
		d, err := b.main.Take(ctx, req)
		b.count(err)
		return d, err
	}
	ctx, cancel := context.WithTimeout(ctx, b.wait)
	defer cancel()
	d, err := b.main.Take(ctx, req)
	b.count(err)
	return d, err
}

func (b *backend) acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	ctx, cancel := context.WithTimeout(ctx, b.wait)
	defer cancel()
	d, err := b.leases.Acquire(ctx, req)
	b.count(err)
	return d, err
}

func (b *backend) release(ctx context.Context, store bucket.LeaseStore, subject, name, id string) error {
	ctx, cancel := context.WithTimeout(ctx, b.wait)
	defer cancel()
	err := store.Release(ctx, subject, name, id)
	if store == b.leases {
		b.count(err)
	}
	return err
}

func (b *backend) count(err error) {
	if err == nil || errors.Is(err, bucket.ErrInvalidRequest) {
		return
	}
	b.storeFailures.Add(1)
	if bucket.MayHaveApplied(err) {
		b.unknownOutcomes.Add(1)
	}
}

// takeLocal decides req in the local store, with every limit scaled by the
// local share. The request's ID is dropped: the local store never loses a
// reply.
func (b *backend) takeLocal(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	local := bucket.Request{Subject: req.Subject, Mode: req.Mode, Charges: make([]bucket.Charge, len(req.Charges))}
	for i, c := range req.Charges {
		c.Limit = b.scale(c.Limit)
		local.Charges[i] = c
	}
	return b.local.Take(ctx, local)
}

// scale returns l at the local share.
func (b *backend) scale(l bucket.Limit) bucket.Limit {
	return bucket.Limit{Capacity: l.Capacity * b.share, RefillPerSecond: l.RefillPerSecond * b.share}
}

// scaleConcurrency returns a concurrency limit at the local share, at least
// one call.
func (b *backend) scaleConcurrency(n int) int {
	return max(1, int(math.Floor(float64(n)*b.share)))
}

// deadline bounds every Take of a store by a timeout.
type deadline struct {
	bucket.Store
	wait time.Duration
}

// Take implements [bucket.Store].
func (d deadline) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	ctx, cancel := context.WithTimeout(ctx, d.wait)
	defer cancel()
	return d.Store.Take(ctx, req)
}

func (b *backend) close() {
	if b.breaker != nil {
		_ = b.breaker.Close() // it only stops the probe
	}
}

// failureLog logs store failures without flooding: the first failure at
// once with its error, then at most one line per interval with the failures
// counted since the previous line. A dead store under load would otherwise
// write a line per call.
type failureLog struct {
	logger *slog.Logger
	every  time.Duration

	mu         sync.Mutex
	last       time.Time // when the last line was written
	suppressed int       // failures since then that were not logged
	unknown    int       // of which may have been applied
	policies   [3]int    // of which answered by each FailurePolicy
}

func newFailureLog(logger *slog.Logger, every time.Duration) *failureLog {
	return &failureLog{logger: logger, every: every}
}

// storeFailed records a failed store call made for op and answered by
// policy.
func (l *failureLog) storeFailed(ctx context.Context, op, procedure, subject string, policy FailurePolicy, err error) {
	unknown := bucket.MayHaveApplied(err)
	l.mu.Lock()
	now := time.Now()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.suppressed++
		if unknown {
			l.unknown++
		}
		if int(policy) < len(l.policies) {
			l.policies[policy]++
		}
		l.mu.Unlock()
		return
	}
	attrs := []any{"op", op, "procedure", procedure, "subject", subject, "policy", policy.String()}
	if unknown {
		// The store may have applied the charge: it is resolved with a
		// resend of the same request ID.
		attrs = append(attrs, "charge", "unknown")
	} else {
		attrs = append(attrs, "charge", "none")
	}
	attrs = append(attrs, "error", err)
	if l.suppressed > 0 {
		attrs = append(attrs, slog.Group("since_last_line",
			"failures", l.suppressed, "charge_unknown", l.unknown,
			"answered_local", l.policies[FailLocal], "answered_open", l.policies[FailOpen], "answered_closed", l.policies[FailClosed]))
	}
	l.last, l.suppressed, l.unknown, l.policies = now, 0, 0, [3]int{}
	l.mu.Unlock()
	l.logger.WarnContext(ctx, "connectlimit: store failed; the failure policy answers the call", attrs...)
}

// breakerChanged logs the circuit breaker opening and closing.
func (l *failureLog) breakerChanged(s breaker.State, cause error) {
	if s == breaker.StateOpen {
		l.logger.Error("connectlimit: store unavailable: circuit breaker open; calls are answered by the failure policy until a probe succeeds", "error", cause)
		return
	}
	l.mu.Lock()
	suppressed := l.suppressed
	l.last, l.suppressed, l.unknown, l.policies = time.Time{}, 0, 0, [3]int{}
	l.mu.Unlock()
	l.logger.Info("connectlimit: store recovered: circuit breaker closed", "failures_not_logged", suppressed)
}
