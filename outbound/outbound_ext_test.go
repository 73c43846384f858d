package outbound_test

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"net/http"
	"reflect"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/outbound"
)

// TestMain checks that no test leaves a goroutine behind. go-redis's own
// log lines are dropped.
func TestMain(m *testing.M) {
	redis.SetLogger(redisstore.NewLogger(slog.New(slog.DiscardHandler)))
	goleak.VerifyTestMain(m,
		// go-redis redials a dead server in the background, once a second.
		goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"),
	)
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

const upstream = "llm"

var quiet = outbound.WithLogger(slog.New(slog.DiscardHandler))

// fixture is a limiter over a memstore, both on one fake clock that only
// Advance moves.
type fixture struct {
	clock *outbound.FakeClock
	store *memstore.Store
	limit bucket.Limit
	lim   *outbound.Limiter
}

func newFixture(t *testing.T, limit bucket.Limit, opts ...outbound.Option) *fixture {
	t.Helper()
	f := &fixture{clock: outbound.NewFakeClock(t0, false), limit: limit}
	f.store = memstore.New(memstore.WithClock(f.clock.Now))
	t.Cleanup(func() { _ = f.store.Close() })
	lim, err := outbound.New(f.store, upstream, limit, append([]outbound.Option{quiet, outbound.WithClock(f.clock)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	f.lim = lim
	return f
}

// level reads the tokens bucket without charging it, at the full limit.
func level(t *testing.T, store bucket.Store, limit bucket.Limit) float64 {
	t.Helper()
	d, err := store.Take(context.Background(), bucket.Request{Subject: "outbound:" + upstream,
		Charges: []bucket.Charge{{Bucket: outbound.TokensBucket, Limit: limit}}})
	if err != nil {
		t.Fatal(err)
	}
	return d.Buckets[0].Remaining
}

type result struct {
	p   *outbound.Permit
	err error
}

// wait starts a Wait in a goroutine.
func wait(ctx context.Context, lim *outbound.Limiter, tokens float64) <-chan result {
	c := make(chan result, 1)
	go func() {
		p, err := lim.Wait(ctx, tokens)
		c <- result{p, err}
	}()
	return c
}

func must(t *testing.T, r result) *outbound.Permit {
	t.Helper()
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.p
}

// pending fails the test if c delivers within a moment.
func pending(t *testing.T, c <-chan result) {
	t.Helper()
	select {
	case r := <-c:
		t.Fatalf("returned early: %+v", r)
	case <-time.After(50 * time.Millisecond):
	}
}

// TestWaitChargesWhatItWaitedFor: a Wait the bucket cannot pay sleeps the
// store's RetryAfter and is then charged, exactly once.
func TestWaitChargesWhatItWaitedFor(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 10, RefillPerSecond: 1})
	p1 := must(t, <-wait(t.Context(), f.lim, 6))
	c := wait(t.Context(), f.lim, 6)
	f.clock.WaitForSleepers(t, 1)
	if got := f.clock.Slept(); !reflect.DeepEqual(got, []time.Duration{2 * time.Second}) {
		t.Fatalf("slept %v, want the store's RetryAfter, 2s", got)
	}
	f.clock.Advance(2 * time.Second)
	p2 := must(t, <-c)
	if got := level(t, f.store, f.limit); got != 0 {
		t.Fatalf("bucket holds %v, want 10 - 6 - 6 + 2 = 0", got)
	}
	p1.Done(outbound.Feedback{})
	p2.Done(outbound.Feedback{})
	p2.Done(outbound.Feedback{Limited: true}) // a second Done does nothing
	if s := f.lim.Stats(); s.InFlight != 0 || s.Pushbacks != 0 || s.Share != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// TestWaitAbandonedChargesNothing: a Wait whose context ends while it
// waits for the bucket, or for a slot, charges nothing.
func TestWaitAbandonedChargesNothing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 10, RefillPerSecond: 1}, outbound.WithMaxInFlight(2))
	p := must(t, <-wait(t.Context(), f.lim, 6))
	defer p.Done(outbound.Feedback{})

	ctx, cancel := context.WithCancel(t.Context())
	c := wait(ctx, f.lim, 6)
	f.clock.WaitForSleepers(t, 1)
	cancel()
	if r := <-c; !errors.Is(r.err, context.Canceled) || r.p != nil {
		t.Fatalf("abandoned Wait = %+v, want context.Canceled", r)
	}
	if got := level(t, f.store, f.limit); got != 4 {
		t.Fatalf("bucket holds %v, want 4", got)
	}

	// Both slots taken: a third caller waits for one, and gives up.
	p2 := must(t, <-wait(t.Context(), f.lim, 0))
	defer p2.Done(outbound.Feedback{})
	ctx, cancel = context.WithCancel(t.Context())
	c = wait(ctx, f.lim, 1)
	pending(t, c)
	cancel()
	if r := <-c; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Wait for a slot = %+v, want context.Canceled", r)
	}
	if got := level(t, f.store, f.limit); got != 4 {
		t.Fatalf("bucket holds %v, want 4", got)
	}
}

// TestMaxInFlight: permits beyond the cap wait for a Done.
func TestMaxInFlight(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 100, RefillPerSecond: 1}, outbound.WithMaxInFlight(2))
	p1 := must(t, <-wait(t.Context(), f.lim, 1))
	p2 := must(t, <-wait(t.Context(), f.lim, 1))
	c := wait(t.Context(), f.lim, 1)
	pending(t, c)
	if s := f.lim.Stats(); s.InFlight != 2 {
		t.Fatalf("%d in flight, want 2", s.InFlight)
	}
	p1.Done(outbound.Feedback{})
	p3 := must(t, <-c)
	p2.Done(outbound.Feedback{})
	p3.Done(outbound.Feedback{})
	if got := level(t, f.store, f.limit); got != 97 {
		t.Fatalf("bucket holds %v, want 97", got)
	}
}

// TestWaitInArrivalOrder: a large call that waits is not overtaken by
// small calls that arrive after it and could pay sooner.
func TestWaitInArrivalOrder(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 10, RefillPerSecond: 1})
	must(t, <-wait(t.Context(), f.lim, 10)).Done(outbound.Feedback{})
	big := wait(t.Context(), f.lim, 5)
	f.clock.WaitForSleepers(t, 1)
	small := wait(t.Context(), f.lim, 1)
	pending(t, small) // queued behind big, not asking the store
	f.clock.Advance(time.Second)
	pending(t, small)
	f.clock.Advance(4 * time.Second)
	must(t, <-big).Done(outbound.Feedback{})
	f.clock.WaitForSleepers(t, 1) // small now waits for its token
	f.clock.Advance(time.Second)
	must(t, <-small).Done(outbound.Feedback{})
}

// TestPushback: a refusal pauses new calls for the wait the upstream asked
// for, then lets them go at half the rate; the share recovers over time.
func TestPushback(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 10, RefillPerSecond: 10})
	early := must(t, <-wait(t.Context(), f.lim, 5))
	p := must(t, <-wait(t.Context(), f.lim, 5))
	p.Done(outbound.Feedback{Limited: true, RetryAfter: 3 * time.Second})
	early.Done(outbound.Feedback{Limited: true}) // granted before the cut: no second cut
	if s := f.lim.Stats(); s.Share != 0.5 || !s.PausedUntil.Equal(t0.Add(3*time.Second)) || s.Pushbacks != 2 || s.Slowdowns != 1 {
		t.Fatalf("after a refusal: %+v, want half the rate, paused 3s, 2 pushbacks, 1 slowdown", s)
	}
	c := wait(t.Context(), f.lim, 5)
	f.clock.WaitForSleepers(t, 1)
	f.clock.Advance(3 * time.Second) // the pause; the bucket refilled meanwhile
	must(t, <-c).Done(outbound.Feedback{})
	// At half the rate, 5 tokens take 1s (at the full rate: 0.5s).
	c = wait(t.Context(), f.lim, 5)
	f.clock.WaitForSleepers(t, 1)
	f.clock.Advance(time.Second)
	must(t, <-c).Done(outbound.Feedback{})
	if got := f.clock.Slept(); !reflect.DeepEqual(got, []time.Duration{3 * time.Second, time.Second}) {
		t.Fatalf("slept %v, want the pause, then 1s at half the rate", got)
	}
	f.clock.Advance(8 * time.Second)
	if s := f.lim.Stats(); math.Abs(s.Share-0.95) > 1e-9 {
		t.Fatalf("9s after the pause: share %v, want 0.5 + 9 × 0.05", s.Share)
	}
	f.clock.Advance(time.Second)
	if s := f.lim.Stats(); s.Share != 1 {
		t.Fatalf("10s after the pause: share %v, want 1", s.Share)
	}
}

// TestExhaustedCountPauses: an x-ratelimit-remaining-tokens of 0 holds new
// calls until its reset, without slowing down.
func TestExhaustedCountPauses(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 100, RefillPerSecond: 10})
	p := must(t, <-wait(t.Context(), f.lim, 1))
	h := http.Header{}
	h.Set("x-ratelimit-remaining-tokens", "0")
	h.Set("x-ratelimit-reset-tokens", "2s")
	p.Done(outbound.Feedback{Header: h})
	c := wait(t.Context(), f.lim, 1)
	f.clock.WaitForSleepers(t, 1)
	f.clock.Advance(2 * time.Second)
	must(t, <-c).Done(outbound.Feedback{})
	if s := f.lim.Stats(); s.Share != 1 || s.Slowdowns != 0 {
		t.Fatalf("stats %+v: want no slowdown", s)
	}
	// The bucket held 99 tokens when the upstream said it had none; it is
	// drained to what the upstream refilled since (2s at 10 a second),
	// then charged the call.
	if got := level(t, f.store, f.limit); got != 19 {
		t.Fatalf("bucket holds %v, want 20 - 1", got)
	}
}

// TestRefusalDrains: after a refusal, the bucket holds no more than the
// upstream said it had left, plus what it refilled since.
func TestRefusalDrains(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 100, RefillPerSecond: 10})
	p := must(t, <-wait(t.Context(), f.lim, 10))
	h := http.Header{}
	h.Set("x-ratelimit-remaining-tokens", "5")
	p.Done(outbound.Feedback{Limited: true, RetryAfter: time.Second, Header: h})
	c := wait(t.Context(), f.lim, 1)
	f.clock.WaitForSleepers(t, 1)
	f.clock.Advance(time.Second)
	must(t, <-c).Done(outbound.Feedback{})
	// 90 left when the upstream said 5; 1s later, at half the rate: 10;
	// then the call took 1.
	if got := level(t, f.store, f.limit); got != 9 {
		t.Fatalf("bucket holds %v, want 9", got)
	}
}

// TestRequestLimit: with a request limit, every call also takes a request.
func TestRequestLimit(t *testing.T) {
	t.Parallel()
	f := newFixture(t, bucket.Limit{Capacity: 100, RefillPerSecond: 100},
		outbound.WithRequestLimit(bucket.Limit{Capacity: 2, RefillPerSecond: 1}))
	must(t, <-wait(t.Context(), f.lim, 0)).Done(outbound.Feedback{})
	must(t, <-wait(t.Context(), f.lim, 0)).Done(outbound.Feedback{})
	c := wait(t.Context(), f.lim, 0)
	f.clock.WaitForSleepers(t, 1)
	if got := f.clock.Slept(); !reflect.DeepEqual(got, []time.Duration{time.Second}) {
		t.Fatalf("slept %v, want 1s for a request", got)
	}
	f.clock.Advance(time.Second)
	must(t, <-c).Done(outbound.Feedback{})
}

func TestNewAndWaitErrors(t *testing.T) {
	t.Parallel()
	store := memstore.New()
	defer store.Close()
	limit := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	for _, tc := range []struct {
		name  string
		store bucket.Store
		up    string
		limit bucket.Limit
		opt   outbound.Option
	}{
		{"no store", nil, upstream, limit, quiet},
		{"no name", store, "", limit, quiet},
		{"bad limit", store, upstream, bucket.Limit{}, quiet},
		{"bad request limit", store, upstream, limit, outbound.WithRequestLimit(bucket.Limit{Capacity: -1, RefillPerSecond: 1})},
		{"zero in flight", store, upstream, limit, outbound.WithMaxInFlight(0)},
		{"backoff of 1", store, upstream, limit, outbound.WithBackoff(1, 0.1)},
		{"min share of 0", store, upstream, limit, outbound.WithBackoff(0.5, 0)},
		{"no recovery", store, upstream, limit, outbound.WithRecovery(0)},
		{"zero pause", store, upstream, limit, outbound.WithPause(0, time.Second)},
		{"zero store timeout", store, upstream, limit, outbound.WithStoreTimeout(0)},
	} {
		if _, err := outbound.New(tc.store, tc.up, tc.limit, tc.opt); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	lim, err := outbound.New(store, upstream, limit, quiet, outbound.WithoutMaxInFlight())
	if err != nil {
		t.Fatal(err)
	}
	for _, tokens := range []float64{-1, 11} {
		if _, err := lim.Wait(t.Context(), tokens); !errors.Is(err, outbound.ErrOverCapacity) {
			t.Errorf("Wait(%v) = %v, want ErrOverCapacity", tokens, err)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := lim.Wait(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait with a done context = %v", err)
	}
	var nilPermit *outbound.Permit
	nilPermit.Done(outbound.Feedback{}) // harmless
}
