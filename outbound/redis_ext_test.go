package outbound_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/internal/redistest"
	"github.com/connectlimit/connectlimit/outbound"
)

// redisClient is configured as the redisstore documentation asks.
func redisClient(t *testing.T, rs *redistest.Server) *redis.Client {
	t.Helper()
	return rs.NewClient(t, func(o *redis.Options) {
		o.ContextTimeoutEnabled = true
		o.MaxRetries = -1
		o.DialerRetries = 1
	})
}

// TestRedisSharedBudget: two processes (two stores, two limiters of one
// upstream) share one budget in Redis. Every Wait is let through in the
// end, and together they never take more than capacity + rate × elapsed.
func TestRedisSharedBudget(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	limit := bucket.Limit{Capacity: 20, RefillPerSecond: 100}
	var lims []*outbound.Limiter
	for range 2 {
		lim, err := outbound.New(redisstore.New(redisClient(t, rs)), upstream, limit, quiet)
		if err != nil {
			t.Fatal(err)
		}
		lims = append(lims, lim)
	}
	const waiters, each = 8, 10 // 80 tokens: 20 at once, 60 over 0.6s
	var granted atomic.Int64
	var mu sync.Mutex
	var grants []time.Duration
	start := time.Now()
	var wg sync.WaitGroup
	for i := range waiters {
		lim := lims[i%len(lims)]
		wg.Go(func() {
			for range each {
				p, err := lim.Wait(t.Context(), 1)
				if err != nil {
					t.Error(err)
					return
				}
				granted.Add(1)
				mu.Lock()
				grants = append(grants, time.Since(start))
				mu.Unlock()
				p.Done(outbound.Feedback{})
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if granted.Load() != waiters*each {
		t.Fatalf("%d of %d Waits granted", granted.Load(), waiters*each)
	}
	// At no instant were more tokens granted than the bucket could give.
	for n, at := range grants {
		if bound := limit.Capacity + limit.RefillPerSecond*at.Seconds() + 1; float64(n+1) > bound {
			t.Fatalf("%d tokens granted by %v, more than capacity + rate × elapsed = %.1f", n+1, at, bound)
		}
	}
	if elapsed < 590*time.Millisecond {
		t.Fatalf("%d tokens granted in %v, faster than the bucket allows (0.6s)", waiters*each, elapsed)
	}
	t.Logf("%d tokens granted in %v (the bucket allows them in 0.6s)", waiters*each, elapsed.Round(time.Millisecond))
}

// TestRedisAbandonedChargesNothing: a Wait abandoned by its context leaves
// Redis as it was.
func TestRedisAbandonedChargesNothing(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	store := redisstore.New(redisClient(t, rs))
	limit := bucket.Limit{Capacity: 10, RefillPerSecond: 0.001}
	lim, err := outbound.New(store, upstream, limit, quiet)
	if err != nil {
		t.Fatal(err)
	}
	p, err := lim.Wait(t.Context(), 8)
	if err != nil {
		t.Fatal(err)
	}
	p.Done(outbound.Feedback{})
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if _, err := lim.Wait(ctx, 5); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait = %v, want the deadline", err)
	}
	if got := level(t, store, limit); got < 2 || got > 2.01 {
		t.Fatalf("Redis holds %v tokens, want 2 (and a bit of refill)", got)
	}
}

// lossy is a store whose first Takes fail the way a lost reply does.
type lossy struct {
	bucket.Store
	mu sync.Mutex
	// script says what the next Takes do; once it runs out, Takes reach
	// the store.
	script []fault
	modes  []bucket.Mode
}

type fault uint8

const (
	appliedLost    fault = iota // reaches the store, then the reply is lost
	notAppliedLost              // never reaches it, but looks like a lost reply
	refused                     // never reaches it, and says so
)

func (l *lossy) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	l.mu.Lock()
	l.modes = append(l.modes, req.Mode)
	var f fault
	scripted := len(l.script) > 0
	if scripted {
		f, l.script = l.script[0], l.script[1:]
	}
	l.mu.Unlock()
	if !scripted {
		return l.Store.Take(ctx, req)
	}
	switch f {
	case appliedLost:
		if _, err := l.Store.Take(ctx, req); err != nil {
			return bucket.Decision{}, err
		}
		return bucket.Decision{}, fmt.Errorf("lossy: %w", bucket.ErrOutcomeUnknown)
	case notAppliedLost:
		return bucket.Decision{}, fmt.Errorf("lossy: %w", bucket.ErrOutcomeUnknown)
	default:
		return bucket.Decision{}, fmt.Errorf("lossy: %w", bucket.ErrNotApplied)
	}
}

// TestRedisLostReplies: a take whose reply is lost is resolved with its ID,
// so that the call is charged exactly once if it is let through, and not
// at all if it is not.
func TestRedisLostReplies(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	limit := bucket.Limit{Capacity: 10, RefillPerSecond: 0.001}
	for _, tc := range []struct {
		name       string
		script     []fault
		wantErr    error // nil: a permit
		wantLevel  float64
		wantCalled []bucket.Mode
	}{
		{"applied, reply lost: resolved as charged", []fault{appliedLost}, nil, 6,
			[]bucket.Mode{bucket.ModeTake, bucket.ModeAdjust}},
		{"not applied, reply lost: resolved, then charged anew", []fault{notAppliedLost}, nil, 6,
			[]bucket.Mode{bucket.ModeTake, bucket.ModeAdjust, bucket.ModeTake}},
		{"the resolution's replies are lost too", []fault{appliedLost, notAppliedLost, notAppliedLost}, nil, 6,
			[]bucket.Mode{bucket.ModeTake, bucket.ModeAdjust, bucket.ModeAdjust, bucket.ModeAdjust}},
		{"never resolved", []fault{notAppliedLost, notAppliedLost, notAppliedLost, notAppliedLost}, bucket.ErrOutcomeUnknown, 10,
			[]bucket.Mode{bucket.ModeTake, bucket.ModeAdjust, bucket.ModeAdjust, bucket.ModeAdjust}},
		{"refused: nothing charged", []fault{refused}, bucket.ErrNotApplied, 10,
			[]bucket.Mode{bucket.ModeTake}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := redisstore.New(redisClient(t, rs), redisstore.WithKeyPrefix(fmt.Sprintf("t%d", time.Now().UnixNano())))
			faulty := &lossy{Store: store, script: tc.script}
			lim, err := outbound.New(faulty, upstream, limit, quiet)
			if err != nil {
				t.Fatal(err)
			}
			p, err := lim.Wait(t.Context(), 4)
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("Wait: %v", err)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Fatalf("Wait = %v, want %v", err, tc.wantErr)
			}
			p.Done(outbound.Feedback{})
			if got := level(t, store, limit); got < tc.wantLevel || got > tc.wantLevel+0.01 {
				t.Fatalf("Redis holds %v tokens, want %v", got, tc.wantLevel)
			}
			faulty.mu.Lock()
			defer faulty.mu.Unlock()
			if !equalModes(faulty.modes, tc.wantCalled) {
				t.Fatalf("store calls %v, want %v", faulty.modes, tc.wantCalled)
			}
		})
	}
}

func equalModes(a, b []bucket.Mode) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
