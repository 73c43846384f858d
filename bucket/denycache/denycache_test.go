package denycache_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/denycache"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

// TestMain fails the package's tests if any leaves a goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestContract(t *testing.T) {
	t.Parallel()
	buckettest.Run(t, func(t *testing.T, clock *buckettest.Clock) bucket.Store {
		return denycache.New(newMemstore(t, clock), denycache.WithClock(clock.Now))
	})
}

// TestContractWithIDs runs the contract around a store that remembers
// request IDs, as Redis does, so that the suite's idempotency cases run
// too.
func TestContractWithIDs(t *testing.T) {
	t.Parallel()
	t.Run("Store", func(t *testing.T) {
		t.Parallel()
		buckettest.Run(t, func(t *testing.T, clock *buckettest.Clock) bucket.Store {
			return newIDStore(newMemstore(t, clock), clock.Now)
		})
	})
	t.Run("Cache", func(t *testing.T) {
		t.Parallel()
		buckettest.Run(t, func(t *testing.T, clock *buckettest.Clock) bucket.Store {
			return denycache.New(newIDStore(newMemstore(t, clock), clock.Now), denycache.WithClock(clock.Now))
		})
	})
}

func TestLeaseContract(t *testing.T) {
	t.Parallel()
	buckettest.RunLeases(t, func(t *testing.T, clock *buckettest.Clock) bucket.LeaseStore {
		return denycache.New(newMemstore(t, clock), denycache.WithClock(clock.Now))
	})
}

func TestWithoutLeases(t *testing.T) {
	t.Parallel()
	s := denycache.New(newIDStore(newMemstore(t, buckettest.NewClock(t0)), time.Now))
	_, err := s.Acquire(t.Context(), bucket.LeaseRequest{Subject: "a", Name: "n", Limit: 1, ID: "x", TTL: time.Second})
	if !errors.Is(err, errors.ErrUnsupported) || bucket.MayHaveApplied(err) {
		t.Errorf("Acquire on a store without leases: %v, want ErrUnsupported and ErrNotApplied", err)
	}
	if err := s.Release(t.Context(), "a", "n", "x"); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Release on a store without leases: %v, want ErrUnsupported", err)
	}
	if s.InProcess() {
		t.Error("InProcess() = true around a store that is not in process")
	}
	if !denycache.New(newMemstore(t, buckettest.NewClock(t0))).InProcess() {
		t.Error("InProcess() = false around memstore")
	}
}

// newMemstore returns a memstore on clock, closed with the test.
func newMemstore(t *testing.T, clock *buckettest.Clock) *memstore.Store {
	t.Helper()
	s := memstore.New(memstore.WithClock(clock.Now), memstore.WithSweepInterval(0))
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// idStore gives a memstore the request-ID memory of a store that can lose
// replies: a request whose subject and ID it applied within the ID window
// is answered as a duplicate. It is not in process, so the contract's
// idempotency cases run against it.
type idStore struct {
	mem *memstore.Store
	now func() time.Time
	mu  sync.Mutex
	ids map[[2]string]time.Time
}

func newIDStore(mem *memstore.Store, now func() time.Time) *idStore {
	return &idStore{mem: mem, now: now, ids: make(map[[2]string]time.Time)}
}

func (s *idStore) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if req.ID == "" || req.Validate() != nil {
		return s.mem.Take(ctx, req)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k := [2]string{req.Subject, req.ID}
	plain := req
	plain.ID, plain.IDWindow = "", 0
	if until, ok := s.ids[k]; ok && s.now().Before(until) {
		plain.Mode = bucket.ModeTake
		plain.Charges = make([]bucket.Charge, len(req.Charges))
		for i, c := range req.Charges {
			c.Cost = 0
			plain.Charges[i] = c
		}
		d, err := s.mem.Take(ctx, plain)
		if err != nil {
			return d, err
		}
		tokens := make([]float64, len(d.Buckets))
		for i, b := range d.Buckets {
			tokens[i] = b.Remaining
		}
		return bucket.DecideDuplicate(req, tokens), nil
	}
	d, err := s.mem.Take(ctx, plain)
	if err == nil && d.Allowed {
		s.ids[k] = s.now().Add(req.Window())
	}
	return d, err
}

// spyStore counts the calls that reach a store, and can hold or fail them.
type spyStore struct {
	bucket.Store
	calls atomic.Int64
	mu    sync.Mutex
	// hold, when set, makes the next call decide and then wait for the
	// channel to close before it returns; arrived gets that call's request
	// once it has decided.
	hold    chan struct{}
	arrived chan bucket.Request
	// fail, when set, is returned after the call was decided and applied:
	// a lost reply.
	fail error
}

func (s *spyStore) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	s.calls.Add(1)
	d, err := s.Store.Take(ctx, req)
	s.mu.Lock()
	hold, arrived, fail := s.hold, s.arrived, s.fail
	s.hold, s.arrived = nil, nil
	s.mu.Unlock()
	if arrived != nil {
		arrived <- req
	}
	if hold != nil {
		<-hold
	}
	if fail != nil && err == nil {
		return bucket.Decision{}, fail
	}
	return d, err
}

// holdNext makes the next call wait, once decided, until the returned
// function is called, and returns the channel on which that call's request
// is sent once it has been decided.
func (s *spyStore) holdNext() (<-chan bucket.Request, func()) {
	hold, arrived := make(chan struct{}), make(chan bucket.Request, 1)
	s.mu.Lock()
	s.hold, s.arrived = hold, arrived
	s.mu.Unlock()
	return arrived, func() { close(hold) }
}

func (s *spyStore) setFail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail = err
}

// rig is a Store under test on a fake clock, over a memstore reached
// through a spyStore (and an idStore when it remembers IDs).
type rig struct {
	clock *buckettest.Clock
	mem   *memstore.Store
	inner bucket.Store // what the spy wraps
	spy   *spyStore
	cache *denycache.Store
}

func newRig(t *testing.T, withIDs bool, opts ...denycache.Option) *rig {
	t.Helper()
	r := &rig{clock: buckettest.NewClock(t0)}
	r.mem = newMemstore(t, r.clock)
	r.inner = r.mem
	if withIDs {
		r.inner = newIDStore(r.mem, r.clock.Now)
	}
	r.spy = &spyStore{Store: r.inner}
	r.cache = denycache.New(r.spy, append([]denycache.Option{denycache.WithClock(r.clock.Now)}, opts...)...)
	return r
}

// take sends req through the cache and reports whether it reached the
// store.
func (r *rig) take(t *testing.T, req bucket.Request) (bucket.Decision, bool) {
	t.Helper()
	before := r.spy.calls.Load()
	d, err := r.cache.Take(t.Context(), req)
	if err != nil {
		t.Fatalf("Take(%+v): %v", req, err)
	}
	return d, r.spy.calls.Load() != before
}

func charge(name string, capacity, rate, cost float64) bucket.Charge {
	return bucket.Charge{Bucket: name, Limit: bucket.Limit{Capacity: capacity, RefillPerSecond: rate}, Cost: cost}
}

func request(subject string, charges ...bucket.Charge) bucket.Request {
	return bucket.Request{Subject: subject, Charges: charges}
}

// sameDecision fails unless got (a local denial) is what the store gave,
// up to float64 rounding.
func sameDecision(t *testing.T, label string, got, want bucket.Decision) {
	t.Helper()
	closeDur := func(a, b time.Duration) bool { return a-b <= time.Nanosecond && b-a <= time.Nanosecond }
	ok := got.Allowed == want.Allowed && got.Duplicate == want.Duplicate && closeDur(got.RetryAfter, want.RetryAfter) &&
		len(got.Buckets) == len(want.Buckets)
	for i := 0; ok && i < len(got.Buckets); i++ {
		g, w := got.Buckets[i], want.Buckets[i]
		ok = g.Bucket == w.Bucket && g.Limit == w.Limit && g.Cost == w.Cost && g.Allowed == w.Allowed &&
			math.Abs(g.Remaining-w.Remaining) <= 1e-9*math.Max(1, math.Abs(w.Remaining)) &&
			closeDur(g.RetryAfter, w.RetryAfter) && closeDur(g.ResetAfter, w.ResetAfter)
	}
	if !ok {
		t.Fatalf("%s: local decision\n%+v\nwant the store's\n%+v", label, got, want)
	}
}

// step is one call of a scenario: advance the clock, send a request, and
// check whether the store was asked and what was decided.
type step struct {
	advance time.Duration
	req     bucket.Request
	// wantStore says the request reached the store; a request that did not
	// must have been denied exactly as the store would have.
	wantStore   bool
	wantAllowed bool
	wantRetry   time.Duration
}

func TestTake(t *testing.T) {
	t.Parallel()
	lim := func(cost float64) bucket.Charge { return charge("b", 10, 1, cost) }
	alice := func(charges ...bucket.Charge) bucket.Request { return request("alice", charges...) }
	adjust := func(cost float64) bucket.Request {
		return bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{lim(cost)}}
	}
	// drained is where most cases start: the bucket emptied by the store,
	// and a denial of 3 tokens that the cache remembers.
	drained := []step{
		{req: alice(lim(10)), wantStore: true, wantAllowed: true},
		{req: alice(lim(3)), wantStore: true, wantRetry: 3 * time.Second},
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{
			name: "denial lasts until it could pay and not a microsecond longer",
			steps: append(drained[:2:2],
				step{req: alice(lim(3)), wantRetry: 3 * time.Second},
				step{advance: time.Second, req: alice(lim(3)), wantRetry: 2 * time.Second},
				step{advance: 2*time.Second - time.Microsecond, req: alice(lim(3)), wantRetry: time.Microsecond},
				step{advance: time.Microsecond, req: alice(lim(3)), wantStore: true, wantAllowed: true},
				// The allowed reply refreshed the entry: empty again.
				step{req: alice(lim(1)), wantRetry: time.Second},
			),
		},
		{
			name: "the wait is for the cost asked",
			steps: append(drained[:2:2],
				step{advance: 500 * time.Millisecond, req: alice(lim(1)), wantRetry: 500 * time.Millisecond},
				step{req: alice(lim(2)), wantRetry: 1500 * time.Millisecond},
				step{req: alice(lim(0.5)), wantStore: true, wantAllowed: true},
			),
		},
		{
			name: "a zero-cost read goes to the store",
			steps: append(drained[:2:2],
				step{req: alice(lim(0)), wantStore: true, wantAllowed: true},
			),
		},
		{
			name: "a cost over capacity is denied for good",
			steps: []step{
				{req: alice(lim(11)), wantStore: true},
				{req: alice(lim(11))},
				{advance: 500 * time.Millisecond, req: alice(lim(11))},
				{req: alice(lim(10)), wantStore: true, wantAllowed: true},
			},
		},
		{
			name: "another limit for the bucket goes to the store",
			steps: append(drained[:2:2],
				step{req: alice(charge("b", 10, 2, 3)), wantStore: true, wantRetry: 1500 * time.Millisecond},
				step{req: alice(charge("b", 10, 2, 3)), wantRetry: 1500 * time.Millisecond},
			),
		},
		{
			name: "another subject or bucket goes to the store",
			steps: append(drained[:2:2],
				step{req: request("bob", lim(3)), wantStore: true, wantAllowed: true},
				step{req: alice(charge("c", 10, 1, 3)), wantStore: true, wantAllowed: true},
			),
		},
		{
			name: "a refund invalidates the entry",
			steps: append(drained[:2:2],
				step{req: adjust(-5), wantStore: true, wantAllowed: true},
				step{req: alice(lim(3)), wantStore: true, wantAllowed: true},
				// The reply set the entry to 2 tokens.
				step{req: alice(lim(3)), wantRetry: time.Second},
			),
		},
		{
			name: "an overrun settled through the cache lowers the entry",
			steps: append(drained[:2:2],
				step{advance: 2 * time.Second, req: adjust(4), wantStore: true, wantAllowed: true},
				step{req: alice(lim(1)), wantRetry: 3 * time.Second},
				// A read in debt is denied, but by the store: it asks for
				// the exact levels.
				step{req: alice(lim(0)), wantStore: true, wantRetry: 2 * time.Second},
			),
		},
		{
			name: "an allowed reply creates no entry",
			steps: []step{
				{req: alice(lim(10)), wantStore: true, wantAllowed: true},
				{req: alice(lim(1)), wantStore: true, wantRetry: time.Second},
			},
		},
		{
			name: "an entry is forgotten once its bucket is full",
			steps: append(drained[:2:2],
				step{advance: time.Hour, req: alice(lim(11)), wantStore: true},
				step{req: alice(lim(11))},
				step{advance: time.Second, req: alice(lim(11)), wantStore: true},
			),
		},
		{
			name: "every bucket of a denied request is remembered",
			steps: []step{
				{req: alice(charge("a", 10, 1, 9), charge("b", 5, 1, 5)), wantStore: true, wantAllowed: true},
				{req: alice(charge("a", 10, 1, 1), charge("b", 5, 1, 2)), wantStore: true, wantRetry: 2 * time.Second},
				// Either bucket alone, in any order, or with a bucket the
				// cache does not know, is judged locally when it cannot pay.
				{req: alice(charge("b", 5, 1, 1)), wantRetry: time.Second},
				{req: alice(charge("a", 10, 1, 2)), wantRetry: time.Second},
				{req: alice(charge("c", 7, 1, 1), charge("b", 5, 1, 1)), wantRetry: time.Second},
				{req: alice(charge("b", 5, 1, 1), charge("a", 10, 1, 3)), wantRetry: 2 * time.Second},
				{req: alice(charge("a", 10, 1, 1)), wantStore: true, wantAllowed: true},
				{advance: time.Second, req: alice(charge("a", 10, 1, 1), charge("b", 5, 1, 1)), wantStore: true, wantAllowed: true},
				{req: alice(charge("b", 5, 1, 1)), wantRetry: time.Second},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			runSteps(t, newRig(t, false), tc.steps)
		})
	}
}

func runSteps(t *testing.T, r *rig, steps []step) {
	t.Helper()
	for i, st := range steps {
		r.clock.Advance(st.advance)
		label := fmt.Sprintf("step %d (%+v)", i, st.req)
		d, stored := r.take(t, st.req)
		if stored != st.wantStore {
			t.Fatalf("%s: reached the store: %v, want %v (decision %+v)", label, stored, st.wantStore, d)
		}
		if d.Allowed != st.wantAllowed || (d.RetryAfter-st.wantRetry).Abs() > 10*time.Nanosecond {
			t.Fatalf("%s: Allowed, RetryAfter = %v, %v; want %v, %v (decision %+v)", label, d.Allowed, d.RetryAfter, st.wantAllowed, st.wantRetry, d)
		}
		if !stored {
			// A denial changes nothing in the store, so asking it now is
			// asking it instead.
			want, err := r.inner.Take(t.Context(), st.req)
			if err != nil {
				t.Fatal(err)
			}
			sameDecision(t, label, d, want)
		}
	}
}

// TestLocalDecisionMatchesStore drives one bucket through a long run of
// denials at uneven instants and costs, and checks every local denial
// against the store's own answer.
func TestLocalDecisionMatchesStore(t *testing.T) {
	t.Parallel()
	r := newRig(t, false)
	lim := bucket.Limit{Capacity: 7.5, RefillPerSecond: 0.37}
	local := 0
	for i := range 2000 {
		r.clock.Advance(time.Duration(i%13) * 7919 * time.Microsecond)
		req := request("alice", bucket.Charge{Bucket: "b", Limit: lim, Cost: float64(i%9) * 0.45})
		d, stored := r.take(t, req)
		if stored {
			continue
		}
		local++
		want, err := r.inner.Take(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		sameDecision(t, fmt.Sprintf("call %d", i), d, want)
	}
	if local < 1000 {
		t.Fatalf("only %d of 2000 calls were denied locally", local)
	}
}

func TestInFlight(t *testing.T) {
	t.Parallel()
	r := newRig(t, false)
	lim := charge("b", 10, 1, 1)
	r.take(t, request("alice", charge("b", 10, 1, 10)))
	if _, stored := r.take(t, request("alice", lim)); !stored {
		t.Fatal("first denial did not reach the store")
	}
	r.clock.Advance(time.Second)
	// One token is back: of a crowd arriving together, one goes to the
	// store, and the others are denied while it is in flight.
	arrived, release := r.spy.holdNext()
	done := make(chan bucket.Decision)
	go func() {
		d, _ := r.cache.Take(context.Background(), request("alice", lim))
		done <- d
	}()
	<-arrived
	const crowd = 50
	calls := r.spy.calls.Load()
	var wg sync.WaitGroup
	var localN atomic.Int64
	for range crowd {
		wg.Go(func() {
			d, err := r.cache.Take(context.Background(), request("alice", lim))
			if err == nil && !d.Allowed && d.RetryAfter == time.Second && d.Buckets[0].Remaining == 0 {
				localN.Add(1)
			}
		})
	}
	wg.Wait()
	if got := r.spy.calls.Load() - calls; got != 0 {
		t.Fatalf("%d of a crowd of %d reached the store while one token was in flight, want none", got, crowd)
	}
	if got := localN.Load(); got != crowd {
		t.Fatalf("%d of %d requests denied locally while one token was in flight, want all", got, crowd)
	}
	// A smaller cost is denied too: the token is spoken for.
	if d, stored := r.take(t, request("alice", charge("b", 10, 1, 0.5))); stored || d.Allowed {
		t.Fatalf("half a token while one is in flight: stored %v, %+v", stored, d)
	}
	release()
	if d := <-done; !d.Allowed {
		t.Fatalf("the request in flight was denied: %+v", d)
	}
	if _, stored := r.take(t, request("alice", lim)); stored {
		t.Fatal("after the allowed reply, the empty bucket went to the store")
	}
	if st := r.cache.Stats(); st.StoreCalls != 3 || st.LocalDenials != crowd+2 || st.StoreDenials != 1 {
		t.Fatalf("Stats() = %+v, want 3 store calls, %d local denials, 1 store denial", st, crowd+2)
	}
}

func TestInFlightFailure(t *testing.T) {
	t.Parallel()
	r := newRig(t, false)
	lim := charge("b", 10, 1, 1)
	r.take(t, request("alice", charge("b", 10, 1, 10)))
	r.take(t, request("alice", lim))
	r.clock.Advance(time.Second)
	r.spy.setFail(fmt.Errorf("reply lost: %w", bucket.ErrOutcomeUnknown))
	if _, err := r.cache.Take(t.Context(), request("alice", lim)); err == nil {
		t.Fatal("the failing store's error was not returned")
	}
	r.spy.setFail(nil)
	// The failed call released its reservation, and changed no entry: the
	// store took the token, so the next request goes there and is denied.
	d, stored := r.take(t, request("alice", lim))
	if !stored || d.Allowed {
		t.Fatalf("after a failed call: stored %v, %+v; want a denial from the store", stored, d)
	}
}

// TestAdjustRace checks that the reply to a take sent before a refund was
// answered never brings back the level the refund raised.
func TestAdjustRace(t *testing.T) {
	t.Parallel()
	for _, known := range []bool{false, true} {
		t.Run(fmt.Sprintf("known=%v", known), func(t *testing.T) {
			t.Parallel()
			r := newRig(t, false)
			lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1e-3}
			take := func(cost float64) bucket.Request {
				return request("alice", bucket.Charge{Bucket: "b", Limit: lim, Cost: cost})
			}
			if known {
				r.take(t, take(20)) // over capacity: denied, and known full
			}
			// Drained behind the cache's back, so that the cache passes a
			// take that the store denies.
			if _, err := r.mem.Take(t.Context(), take(10)); err != nil {
				t.Fatal(err)
			}
			// A take is decided by the store (denied, empty), and its
			// reply is late.
			arrived, release := r.spy.holdNext()
			done := make(chan struct{})
			go func() {
				defer close(done)
				_, _ = r.cache.Take(context.Background(), take(5))
			}()
			<-arrived
			// Meanwhile a refund is answered.
			if d, _ := r.take(t, bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: -10}}}); !d.Allowed {
				t.Fatalf("refund: %+v", d)
			}
			release()
			<-done
			if d, stored := r.take(t, take(5)); !stored || !d.Allowed {
				t.Fatalf("after the refund: stored %v, %+v; want the store to allow", stored, d)
			}
		})
	}
}

// TestRefundElsewhere shows the documented under-admission: a refund
// through another instance is not seen until the entry's level would have
// paid anyway.
func TestRefundElsewhere(t *testing.T) {
	t.Parallel()
	r := newRig(t, false)
	other := denycache.New(r.mem, denycache.WithClock(r.clock.Now))
	lim := charge("b", 10, 1, 3)
	r.take(t, request("alice", charge("b", 10, 1, 10)))
	r.take(t, request("alice", lim))
	if _, err := other.Take(t.Context(), bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{charge("b", 10, 1, -10)}}); err != nil {
		t.Fatal(err)
	}
	if d, stored := r.take(t, request("alice", lim)); stored || d.Allowed {
		t.Fatalf("right after a refund elsewhere: stored %v, %+v; want a local denial", stored, d)
	}
	r.clock.Advance(3 * time.Second)
	if d, stored := r.take(t, request("alice", lim)); !stored || !d.Allowed {
		t.Fatalf("RetryAfter later: stored %v, %+v; want the store to allow", stored, d)
	}
}

func TestIDs(t *testing.T) {
	t.Parallel()
	lim := bucket.Limit{Capacity: 2, RefillPerSecond: 1}
	withID := func(id string, cost float64) bucket.Request {
		return bucket.Request{Subject: "alice", ID: id, Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: cost}}}
	}
	t.Run("a locally denied ID is applied later, not a duplicate", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, true)
		r.take(t, withID("drain", 2))
		r.take(t, withID("x", 1))
		if d, stored := r.take(t, withID("y", 1)); stored || d.Allowed || d.Duplicate {
			t.Fatalf("y: stored %v, %+v; want a local denial", stored, d)
		}
		r.clock.Advance(time.Second)
		if d, stored := r.take(t, withID("y", 1)); !stored || !d.Allowed || d.Duplicate {
			t.Fatalf("y once payable: stored %v, %+v; want applied by the store", stored, d)
		}
	})
	t.Run("a resend after a lost reply goes to the store", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, true)
		r.spy.setFail(fmt.Errorf("timeout: %w", bucket.ErrOutcomeUnknown))
		if _, err := r.cache.Take(t.Context(), withID("lost", 2)); !bucket.MayHaveApplied(err) {
			t.Fatalf("lost reply: %v", err)
		}
		r.spy.setFail(nil)
		// Another request is denied and makes an entry: the bucket is
		// empty, because the lost request was applied.
		if _, stored := r.take(t, withID("other", 1)); !stored {
			t.Fatal("first denial did not reach the store")
		}
		if _, stored := r.take(t, withID("other2", 1)); stored {
			t.Fatal("the entry did not deny")
		}
		d, stored := r.take(t, withID("lost", 2))
		if !stored || !d.Allowed || !d.Duplicate {
			t.Fatalf("resend: stored %v, %+v; want the store's duplicate", stored, d)
		}
	})
	t.Run("a doubt without answer ends with the ID window", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, true)
		r.spy.setFail(fmt.Errorf("timeout: %w", bucket.ErrOutcomeUnknown))
		req := withID("lost", 2)
		req.IDWindow = 10 * time.Second
		_, _ = r.cache.Take(t.Context(), req)
		r.spy.setFail(nil)
		r.take(t, bucket.Request{Subject: "alice", Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 2, RefillPerSecond: 1e-3}, Cost: 1}}})
		slow := bucket.Request{Subject: "alice", ID: "lost", IDWindow: 10 * time.Second, Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 2, RefillPerSecond: 1e-3}, Cost: 2}}}
		r.clock.Advance(10 * time.Second)
		// The store has forgotten the ID too, so it would deny as well.
		if d, stored := r.take(t, slow); stored || d.Allowed {
			t.Fatalf("resend after the window: stored %v, %+v; want a local denial", stored, d)
		}
	})
	t.Run("a repeat of the last allowed ID goes to the store", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, true)
		r.take(t, withID("drain", 2))
		r.take(t, withID("x", 1))
		r.clock.Advance(time.Second)
		if d, stored := r.take(t, withID("x", 1)); !stored || !d.Allowed {
			t.Fatalf("x: stored %v, %+v", stored, d)
		}
		if d, stored := r.take(t, withID("x", 1)); !stored || !d.Duplicate {
			t.Fatalf("x again: stored %v, %+v; want the store's duplicate", stored, d)
		}
		if d, stored := r.take(t, withID("z", 1)); stored || d.Allowed {
			t.Fatalf("z: stored %v, %+v; want a local denial", stored, d)
		}
	})
}

func TestMaxEntries(t *testing.T) {
	t.Parallel()
	r := newRig(t, false, denycache.WithMaxEntries(1))
	lim := charge("b", 1, 1e-3, 2) // over capacity: always denied
	const subjects = 1000
	for i := range subjects {
		r.take(t, request(fmt.Sprint("user:", i), lim))
	}
	st := r.cache.Stats()
	if st.Entries > 64 || st.Evictions < subjects-64 {
		t.Fatalf("Stats() = %+v, want at most 64 entries and at least %d evictions", st, subjects-64)
	}
	// Whatever was evicted, nothing is ever allowed that the store denies.
	for i := range subjects {
		if d, _ := r.take(t, request(fmt.Sprint("user:", i), lim)); d.Allowed {
			t.Fatalf("user:%d allowed over capacity", i)
		}
	}
}

func TestInvalidAndCanceled(t *testing.T) {
	t.Parallel()
	r := newRig(t, false)
	lim := charge("b", 1, 1e-3, 2)
	r.take(t, request("alice", lim))
	// A known subject's malformed request is the store's to report.
	bad := request("alice", lim, lim)
	if _, err := r.cache.Take(t.Context(), bad); !errors.Is(err, bucket.ErrInvalidRequest) {
		t.Fatalf("duplicate bucket: %v, want ErrInvalidRequest", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := r.cache.Take(ctx, request("alice", lim)); err == nil || bucket.MayHaveApplied(err) {
		t.Fatalf("canceled context: %v, want the store's not-applied error", err)
	}
}

// TestConcurrent hammers a few subjects from many goroutines under -race,
// with the clock moving, and checks that the cache never allows more than
// the store would: the store decides every allowed request.
func TestConcurrent(t *testing.T) {
	t.Parallel()
	r := newRig(t, false)
	lim := bucket.Limit{Capacity: 20, RefillPerSecond: 100}
	var allowed atomic.Int64
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 300 {
				if w == 0 && i%10 == 0 {
					r.clock.Advance(10 * time.Millisecond)
				}
				mode, cost := bucket.ModeTake, 1.0
				if i%50 == 49 {
					mode, cost = bucket.ModeAdjust, -0.5
				}
				req := bucket.Request{Subject: fmt.Sprint("s", w%3), Mode: mode, Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: cost}}}
				d, err := r.cache.Take(context.Background(), req)
				if err != nil {
					t.Error(err)
					return
				}
				if d.Allowed && mode == bucket.ModeTake {
					allowed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	st := r.cache.Stats()
	if st.LocalDenials == 0 || uint64(allowed.Load()) > st.StoreCalls {
		t.Fatalf("allowed %d, %+v", allowed.Load(), st)
	}
}
