package memstore_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

// TestMain fails the package's tests if any leaves a goroutine behind,
// such as a sweep that Close did not stop.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestContract(t *testing.T) {
	t.Parallel()
	buckettest.Run(t, func(t *testing.T, clock *buckettest.Clock) bucket.Store {
		s := memstore.New(memstore.WithClock(clock.Now))
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

func TestLeaseContract(t *testing.T) {
	t.Parallel()
	buckettest.RunLeases(t, func(t *testing.T, clock *buckettest.Clock) bucket.LeaseStore {
		s := memstore.New(memstore.WithClock(clock.Now))
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

func TestFullBucketsHoldNoMemory(t *testing.T) {
	t.Parallel()
	clock := buckettest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	s := memstore.New(memstore.WithClock(clock.Now), memstore.WithSweepInterval(0))
	t.Cleanup(func() { _ = s.Close() })
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	for i := range 1000 {
		req := bucket.Request{Subject: string(rune('a'+i%26)) + time.Duration(i).String(), Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: float64(1 + i%10)}}}
		if _, err := s.Take(t.Context(), req); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.Len(); got != 1000 {
		t.Fatalf("Len = %d after 1000 takes, want 1000", got)
	}
	clock.Advance(5 * time.Second)
	s.Sweep()
	// Buckets charged 1..5 are full after 5 s; those charged 6..10 are not.
	if got := s.Len(); got != 500 {
		t.Fatalf("Len = %d after 5 s and a sweep, want 500", got)
	}
	clock.Advance(5 * time.Second)
	s.Sweep()
	if got := s.Len(); got != 0 {
		t.Fatalf("Len = %d after 10 s and a sweep, want 0", got)
	}
	// A refund that fills a bucket deletes it at once.
	req := bucket.Request{Subject: "z", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 3}}}
	if _, err := s.Take(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	req.Mode, req.Charges[0].Cost = bucket.ModeAdjust, -3
	if _, err := s.Take(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	if got := s.Len(); got != 0 {
		t.Fatalf("Len = %d after a full refund, want 0", got)
	}
}

func TestBackgroundSweep(t *testing.T) {
	t.Parallel()
	clock := buckettest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	s := memstore.New(memstore.WithClock(clock.Now), memstore.WithSweepInterval(time.Millisecond))
	t.Cleanup(func() { _ = s.Close() })
	req := bucket.Request{Subject: "a", Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 1, RefillPerSecond: 1}, Cost: 1}}}
	if _, err := s.Take(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for s.Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("background sweep did not delete a full bucket within 10s")
		}
		time.Sleep(time.Millisecond)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// newStore returns a Store on a fake clock, without a background sweep.
func newStore(t *testing.T, opts ...memstore.Option) (*memstore.Store, *buckettest.Clock) {
	t.Helper()
	clock := buckettest.NewClock(t0)
	s := memstore.New(append([]memstore.Option{memstore.WithClock(clock.Now), memstore.WithSweepInterval(0)}, opts...)...)
	t.Cleanup(func() { _ = s.Close() })
	return s, clock
}

// tenPerTen is the limit of most tests below: 10 tokens, refilling at one
// a second, so that a bucket charged c tokens is full c seconds later.
var tenPerTen = bucket.Limit{Capacity: 10, RefillPerSecond: 1}

// charge takes cost tokens (or adjusts by cost, if adjust) from subject's
// bucket name and returns its level after.
func charge(t *testing.T, s *memstore.Store, subject, name string, cost float64, mode bucket.Mode) float64 {
	t.Helper()
	d, err := s.Take(t.Context(), bucket.Request{Subject: subject, Mode: mode, Charges: []bucket.Charge{{Bucket: name, Limit: tenPerTen, Cost: cost}}})
	if err != nil {
		t.Fatal(err)
	}
	if !d.Allowed {
		t.Fatalf("%s/%s: %v %v denied: %+v", subject, name, mode, cost, d)
	}
	return d.Buckets[0].Remaining
}

// level reads subject's bucket name at zero cost.
func level(t *testing.T, s *memstore.Store, subject, name string) float64 {
	t.Helper()
	return charge(t, s, subject, name, 0, bucket.ModeTake)
}

func TestInProcess(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	if !bucket.IsInProcess(s) {
		t.Fatal("IsInProcess(memstore) = false")
	}
	// A Store remembers no IDs: every request is applied, the same ID or
	// not, since nothing it applied is ever resent.
	req := bucket.Request{Subject: "alice", ID: "once", Charges: []bucket.Charge{{Bucket: "b", Limit: tenPerTen, Cost: 3}}}
	for i, want := range []float64{7, 4, 1} {
		d, err := s.Take(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		if !d.Allowed || d.Duplicate || d.Buckets[0].Remaining != want {
			t.Fatalf("take %d with ID %q: %+v, want applied, leaving %v", i, req.ID, d, want)
		}
	}
}

func TestDoneContext(t *testing.T) {
	t.Parallel()
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel := context.WithDeadline(context.Background(), t0)
	defer cancel()
	for _, tc := range []struct {
		name    string
		ctx     context.Context
		wantErr error
	}{
		{"canceled", canceled, context.Canceled},
		{"deadline exceeded", expired, context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, _ := newStore(t)
			lease := bucket.LeaseRequest{Subject: "alice", Name: "gen", Limit: 1, ID: "held", TTL: time.Minute}
			if d, err := s.Acquire(t.Context(), lease); err != nil || !d.Acquired {
				t.Fatalf("Acquire: %+v, %v", d, err)
			}
			check := func(op string, err error) {
				t.Helper()
				if !errors.Is(err, bucket.ErrNotApplied) || !errors.Is(err, tc.wantErr) || bucket.MayHaveApplied(err) {
					t.Errorf("%s: err = %v, want one wrapping bucket.ErrNotApplied and %v", op, err, tc.wantErr)
				}
			}
			_, err := s.Take(tc.ctx, bucket.Request{Subject: "alice", Charges: []bucket.Charge{{Bucket: "b", Limit: tenPerTen, Cost: 3}}})
			check("Take", err)
			_, err = s.Acquire(tc.ctx, bucket.LeaseRequest{Subject: "alice", Name: "other", Limit: 1, ID: "x", TTL: time.Minute})
			check("Acquire", err)
			check("Release", s.Release(tc.ctx, "alice", "gen", "held"))
			// Nothing changed: no bucket, and the lease is still held.
			if n := s.Len(); n != 0 {
				t.Errorf("Len = %d after a failed Take, want 0", n)
			}
			lease.ID = "another"
			if d, err := s.Acquire(t.Context(), lease); err != nil || d.Acquired || d.InUse != 1 {
				t.Errorf("Acquire after a failed Release: %+v, %v; want denied with the lease still held", d, err)
			}
		})
	}
}

func TestEvictionOrder(t *testing.T) {
	t.Parallel()
	// Every bucket belongs to one subject, so one shard, which holds 4.
	type op struct {
		advance time.Duration
		bucket  string
		cost    float64
		mode    bucket.Mode
	}
	setup := []op{{bucket: "a", cost: 5}, {bucket: "b", cost: 1}, {bucket: "c", cost: 9}, {bucket: "d", cost: 3}}
	for _, tc := range []struct {
		name string
		ops  []op
		// wantLevels are the levels of a..f at the end; a forgotten bucket
		// reads full (10).
		wantLevels    map[string]float64
		wantEvictions uint64
	}{
		{
			name:          "nearest to full goes first",
			ops:           []op{{bucket: "e", cost: 2}},
			wantLevels:    map[string]float64{"a": 5, "b": 10, "c": 1, "d": 7, "e": 8},
			wantEvictions: 1,
		},
		{
			name:          "each new bucket evicts the next nearest",
			ops:           []op{{bucket: "e", cost: 8}, {bucket: "f", cost: 8}},
			wantLevels:    map[string]float64{"a": 5, "b": 10, "c": 1, "d": 10, "e": 2, "f": 2},
			wantEvictions: 2,
		},
		{
			name:          "a heavy charge moves a bucket to the back",
			ops:           []op{{bucket: "b", cost: 9}, {bucket: "e", cost: 4}},
			wantLevels:    map[string]float64{"a": 5, "b": 0, "c": 1, "d": 10, "e": 6},
			wantEvictions: 1,
		},
		{
			name:          "a refund moves a bucket to the front",
			ops:           []op{{bucket: "c", cost: -8.5, mode: bucket.ModeAdjust}, {bucket: "e", cost: 1}},
			wantLevels:    map[string]float64{"a": 5, "b": 9, "c": 10, "d": 7, "e": 9},
			wantEvictions: 1,
		},
		{
			// e and f would be full before b: each goes itself, and is
			// not added.
			name:          "a new bucket nearest to full goes itself",
			ops:           []op{{bucket: "e", cost: 0.5}, {bucket: "f", cost: 0.5}},
			wantLevels:    map[string]float64{"a": 5, "b": 9, "c": 1, "d": 7},
			wantEvictions: 2,
		},
		{
			// b is full by then: dropping it is no eviction.
			name:       "a full bucket makes room without an eviction",
			ops:        []op{{advance: time.Second, bucket: "e", cost: 1}},
			wantLevels: map[string]float64{"a": 6, "b": 10, "c": 2, "d": 8, "e": 9},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, clock := newStore(t, memstore.WithMaxBuckets(4*64))
			for _, o := range append(setup[:len(setup):len(setup)], tc.ops...) {
				clock.Advance(o.advance)
				charge(t, s, "alice", o.bucket, o.cost, o.mode)
			}
			if n := s.Len(); n != 4 {
				t.Fatalf("Len = %d, want the shard's bound, 4", n)
			}
			if got := s.Evictions(); got != tc.wantEvictions {
				t.Errorf("Evictions = %d, want %d", got, tc.wantEvictions)
			}
			for _, name := range []string{"a", "b", "c", "d", "e", "f"} {
				want, ok := tc.wantLevels[name]
				if !ok {
					want = 10
				}
				if got := level(t, s, "alice", name); got != want {
					t.Errorf("bucket %s holds %v, want %v", name, got, want)
				}
			}
		})
	}
}

func TestBoundUnderFlood(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		max       int
		wantBound int
		// advance is how far the clock moves before each charge; with 1s,
		// every earlier flood bucket is full by the next charge.
		advance       time.Duration
		wantEvictions bool
	}{
		{name: "below one per shard", max: 1, wantBound: 64, wantEvictions: true},
		{name: "rounded up per shard", max: 1000, wantBound: 1024, wantEvictions: true},
		{name: "larger", max: 8000, wantBound: 8000, wantEvictions: true},
		{name: "flood of buckets that refill", max: 1000, wantBound: 1024, advance: time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, clock := newStore(t, memstore.WithMaxBuckets(tc.max))
			const subjects = 20000
			for i := range subjects {
				clock.Advance(tc.advance)
				charge(t, s, fmt.Sprint("flood:", i), "b", 1, bucket.ModeTake)
				if i%1000 == 0 && s.Len() > tc.wantBound {
					t.Fatalf("Len = %d after %d subjects, want at most %d", s.Len(), i+1, tc.wantBound)
				}
			}
			n := s.Len()
			if n > tc.wantBound {
				t.Fatalf("Len = %d after the flood, want at most %d", n, tc.wantBound)
			}
			// With the clock stopped, every bucket that is gone was evicted.
			want := uint64(0)
			if tc.wantEvictions {
				want = uint64(subjects - n)
			}
			if got := s.Evictions(); got != want {
				t.Fatalf("Evictions = %d with %d buckets left of %d, want %d", got, n, subjects, want)
			}
		})
	}
}

func TestHeavySpenderSurvivesFlood(t *testing.T) {
	t.Parallel()
	for _, max := range []int{2 * 64, 16 * 64, 100_000} {
		t.Run(fmt.Sprint(max), func(t *testing.T) {
			t.Parallel()
			s, clock := newStore(t, memstore.WithMaxBuckets(max))
			charge(t, s, "heavy", "b", 10, bucket.ModeTake)
			charge(t, s, "medium", "b", 5, bucket.ModeTake)
			for i := range 20000 {
				charge(t, s, fmt.Sprint("flood:", i), "b", 1, bucket.ModeTake)
			}
			clock.Advance(time.Second)
			// Flood buckets are full by now; the heavy spender is still
			// empty but for one second's refill.
			if got := level(t, s, "heavy", "b"); got != 1 {
				t.Fatalf("heavy holds %v after the flood, want 1: it was evicted", got)
			}
			if got := level(t, s, "medium", "b"); got != 6 {
				t.Fatalf("medium holds %v after the flood, want 6: it was evicted", got)
			}
		})
	}
}

func TestSweepDropsFullBuckets(t *testing.T) {
	t.Parallel()
	s, clock := newStore(t)
	// Subject i's bucket is charged 1 + i%10 tokens, so it is full that
	// many seconds later; its subject is spread across every shard.
	const subjects = 1000
	for i := range subjects {
		charge(t, s, fmt.Sprint("user:", i), "b", float64(1+i%10), bucket.ModeTake)
	}
	for i, st := range []struct {
		advance time.Duration
		wantLen int
	}{
		{advance: 0, wantLen: 1000},
		{advance: 999 * time.Millisecond, wantLen: 1000},
		{advance: time.Millisecond, wantLen: 900},
		{advance: 2500 * time.Millisecond, wantLen: 700},
		{advance: 500 * time.Millisecond, wantLen: 600},
		{advance: time.Hour, wantLen: 0},
	} {
		clock.Advance(st.advance)
		s.Sweep()
		if got := s.Len(); got != st.wantLen {
			t.Fatalf("step %d: Len = %d after a sweep, want %d", i, got, st.wantLen)
		}
		if i == 3 {
			// The buckets the sweep kept have their levels: user:9 was
			// charged 10 tokens 3.5 seconds ago.
			if got := level(t, s, "user:9", "b"); got != 3.5 {
				t.Fatalf("user:9 holds %v, want 3.5", got)
			}
		}
	}
	if got := s.Evictions(); got != 0 {
		t.Fatalf("Evictions = %d, want 0: the sweep does not evict", got)
	}
}

func TestClockSteppingBack(t *testing.T) {
	t.Parallel()
	s, clock := newStore(t)
	charge(t, s, "alice", "b", 10, bucket.ModeTake)
	for i, st := range []struct {
		advance   time.Duration
		wantLevel float64
	}{
		{advance: 5 * time.Second, wantLevel: 5},
		// A clock that steps back refills nothing, and takes nothing
		// back: the bucket is decided at the latest instant it has seen.
		{advance: -3 * time.Second, wantLevel: 5},
		{advance: 2 * time.Second, wantLevel: 5},
		// Once the clock has passed it, the bucket refills from that
		// instant, not from the earlier ones the clock showed meanwhile.
		{advance: 2 * time.Second, wantLevel: 6},
	} {
		clock.Advance(st.advance)
		if got := level(t, s, "alice", "b"); got != st.wantLevel {
			t.Fatalf("step %d: level = %v, want %v", i, got, st.wantLevel)
		}
	}
}

func TestTakeInto(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	charges := []bucket.Charge{{Bucket: "a", Limit: tenPerTen, Cost: 1}, {Bucket: "b", Limit: tenPerTen, Cost: 2}}
	for _, tc := range []struct {
		name      string
		into      []bucket.BucketState
		wantShare bool
	}{
		{name: "nil allocates", into: nil},
		{name: "too small allocates", into: make([]bucket.BucketState, 1)},
		{name: "large enough is used", into: make([]bucket.BucketState, 0, 2), wantShare: true},
		{name: "length is ignored", into: make([]bucket.BucketState, 3), wantShare: true},
	} {
		d, err := s.Take(t.Context(), bucket.Request{Subject: tc.name, Charges: charges, Into: tc.into})
		if err != nil {
			t.Fatal(err)
		}
		if len(d.Buckets) != 2 || d.Buckets[0].Remaining != 9 || d.Buckets[1].Remaining != 8 {
			t.Fatalf("%s: %+v, want buckets a and b at 9 and 8", tc.name, d)
		}
		if shared := cap(tc.into) > 0 && &d.Buckets[0] == &tc.into[:1][0]; shared != tc.wantShare {
			t.Errorf("%s: decision shares Into's array: %v, want %v", tc.name, shared, tc.wantShare)
		}
	}
	// A denied decision uses Into too.
	into := make([]bucket.BucketState, 2)
	d, err := s.Take(t.Context(), bucket.Request{Subject: "denied", Charges: []bucket.Charge{{Bucket: "a", Limit: tenPerTen, Cost: 11}}, Into: into})
	if err != nil || d.Allowed || &d.Buckets[0] != &into[0] {
		t.Fatalf("denied take: %+v, %v; want a denial in Into's array", d, err)
	}
}

func TestTakeAllocations(t *testing.T) {
	s, clock := newStore(t, memstore.WithMaxBuckets(1<<16))
	ctx := t.Context()
	one := []bucket.Charge{{Bucket: "b", Limit: tenPerTen, Cost: 1}}
	three := []bucket.Charge{{Bucket: "a", Limit: tenPerTen, Cost: 1}, {Bucket: "b", Limit: tenPerTen, Cost: 1}, {Bucket: "c", Limit: tenPerTen, Cost: 1}}
	into := make([]bucket.BucketState, 3)
	subjects := make([]string, 2000)
	for i := range subjects {
		subjects[i] = fmt.Sprint("user:", i)
	}
	for _, tc := range []struct {
		name    string
		charges []bucket.Charge
		into    []bucket.BucketState
		// fresh makes every take charge a new subject.
		fresh bool
		want  float64
	}{
		{name: "existing bucket", charges: one, into: into},
		{name: "existing buckets", charges: three, into: into},
		{name: "without Into", charges: one, want: 1},
		// The Store's arrays grow by a quarter when full, so adding a
		// bucket allocates only now and then.
		{name: "new bucket", charges: one, into: into, fresh: true},
	} {
		i := 0
		got := testing.AllocsPerRun(1000, func() {
			subject := subjects[0]
			if tc.fresh {
				subject, i = subjects[i%len(subjects)], i+1
			}
			clock.Advance(time.Second)
			if _, err := s.Take(ctx, bucket.Request{Subject: subject, Charges: tc.charges, Into: tc.into}); err != nil {
				t.Fatal(err)
			}
		})
		if tc.fresh && got < 0.1 {
			got = 0
		}
		if got != tc.want {
			t.Errorf("%s: %v allocations a take, want %v", tc.name, got, tc.want)
		}
	}
}
