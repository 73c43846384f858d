// Package buckettest is the contract every [bucket.Store] and
// [bucket.LeaseStore] must honour, as a test suite: call [Run] from a
// store's tests, and [RunLeases] too if it limits concurrency.
//
// The suites drive time through a [Clock] that the store under test must
// read, so refill, the expiry of request IDs and the expiry of leases are
// observed without sleeping.
package buckettest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// Clock is a manually advanced clock, safe for concurrent use. Its zero
// value is not usable; the suite makes one per test with [NewClock].
type Clock struct {
	mu  sync.Mutex
	now time.Time
}

// NewClock returns a Clock set to start.
func NewClock(start time.Time) *Clock { return &Clock{now: start} }

// Now returns the clock's current instant.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// NewStore returns an empty store that reads the present from clock. Each
// call must return a store that shares no buckets with earlier ones (a
// fresh process, or a fresh key prefix in a shared backend). The suite does
// not close stores: register clean-up with t.Cleanup.
type NewStore func(t *testing.T, clock *Clock) bucket.Store

// epsilon is the accepted error on token counts: stores may keep time in
// microseconds and tokens in float64.
const epsilon = 1e-6

// durationSlack is the accepted error on durations, for stores that keep
// time in microseconds.
const durationSlack = time.Microsecond

// start is a whole second, so that stores that count in microseconds see
// the same instants as the clock.
var start = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// Run runs the contract suite against stores made by newStore.
func Run(t *testing.T, newStore NewStore) {
	t.Helper()
	runCases(t, newStore, []testCase[NewStore]{
		{"FreshBucketIsFull", testFreshBucketIsFull},
		{"DrainThenRefill", testDrainThenRefill},
		{"SubMillisecondRefill", testSubMillisecondRefill},
		{"FractionalCost", testFractionalCost},
		{"RefillCapsAtCapacity", testRefillCapsAtCapacity},
		{"DenialChangesNothing", testDenialChangesNothing},
		{"CostOverCapacity", testCostOverCapacity},
		{"AllOrNothing", testAllOrNothing},
		{"ZeroCostReads", testZeroCostReads},
		{"AdjustDebtAndRefund", testAdjustDebtAndRefund},
		{"Isolation", testIsolation},
		{"OddSubjects", testOddSubjects},
		{"LimitChange", testLimitChange},
		{"InvalidRequests", testInvalidRequests},
		{"CanceledContext", testCanceledContext},
		{"ConcurrentTakesAreExact", testConcurrent},
		// The cases below need a store that remembers request IDs; they
		// skip stores that never lose a reply (bucket.InProcess).
		{"IdempotentAdjust", testIdempotentAdjust},
		{"IdempotentTake", testIdempotentTake},
		{"TakeResentAsAdjust", testTakeResentAsAdjust},
		{"DeniedTakeRecordsNoID", testDeniedTakeRecordsNoID},
		{"IDExpires", testIDExpires},
		{"IDWindow", testIDWindow},
		{"IDsAreIndependent", testIDsAreIndependent},
		{"SettleIsExact", testSettleIsExact},
	})
}

// testCase is one named case of a contract suite.
type testCase[S any] struct {
	name string
	run  func(*testing.T, S)
}

// runCases runs every case as a parallel subtest against stores made by
// newStore.
func runCases[S any](t *testing.T, newStore S, cases []testCase[S]) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.run(t, newStore)
		})
	}
}

// step is one call in a table-driven scenario: advance the clock, take, and
// check the decision.
type step struct {
	advance       time.Duration
	cost          float64
	wantAllowed   bool
	wantRemaining float64
	wantRetry     time.Duration
	wantReset     time.Duration
}

func runSteps(t *testing.T, newStore NewStore, limit bucket.Limit, steps []step) {
	t.Helper()
	clock := NewClock(start)
	s := newStore(t, clock)
	for i, st := range steps {
		clock.Advance(st.advance)
		d := take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{{Bucket: "b", Limit: limit, Cost: st.cost}}})
		b := d.Buckets[0]
		label := fmt.Sprintf("step %d (advance %v, cost %v)", i, st.advance, st.cost)
		if d.Allowed != st.wantAllowed {
			t.Fatalf("%s: Allowed = %v, want %v (decision %+v)", label, d.Allowed, st.wantAllowed, d)
		}
		checkFloat(t, label+" Remaining", b.Remaining, st.wantRemaining)
		checkDuration(t, label+" RetryAfter", d.RetryAfter, st.wantRetry)
		checkDuration(t, label+" bucket RetryAfter", b.RetryAfter, st.wantRetry)
		checkDuration(t, label+" ResetAfter", b.ResetAfter, st.wantReset)
	}
}

func take(t *testing.T, s bucket.Store, req bucket.Request) bucket.Decision {
	t.Helper()
	d, err := s.Take(t.Context(), req)
	if err != nil {
		t.Fatalf("Take(%+v): %v", req, err)
	}
	if len(d.Buckets) != len(req.Charges) {
		t.Fatalf("Take returned %d bucket states for %d charges", len(d.Buckets), len(req.Charges))
	}
	if d.Duplicate && (req.ID == "" || !d.Allowed) {
		t.Fatalf("Take(%+v) = %+v: a duplicate needs an ID and is allowed", req, d)
	}
	for i, b := range d.Buckets {
		c := req.Charges[i]
		if b.Bucket != c.Bucket || b.Limit != c.Limit || b.Cost != c.Cost {
			t.Fatalf("Buckets[%d] = %+v does not echo charge %+v", i, b, c)
		}
	}
	return d
}

func checkFloat(t *testing.T, what string, got, want float64) {
	t.Helper()
	if math.Abs(got-want) > epsilon*math.Max(1, math.Abs(want)) {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
}

func checkDuration(t *testing.T, what string, got, want time.Duration) {
	t.Helper()
	if got < want-durationSlack || got > want+durationSlack {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
}

func charge(name string, capacity, rate, cost float64) bucket.Charge {
	return bucket.Charge{Bucket: name, Limit: bucket.Limit{Capacity: capacity, RefillPerSecond: rate}, Cost: cost}
}

func testFreshBucketIsFull(t *testing.T, newStore NewStore) {
	runSteps(t, newStore, bucket.Limit{Capacity: 10, RefillPerSecond: 2}, []step{
		{cost: 4, wantAllowed: true, wantRemaining: 6, wantReset: 2 * time.Second},
	})
}

func testDrainThenRefill(t *testing.T, newStore NewStore) {
	runSteps(t, newStore, bucket.Limit{Capacity: 3, RefillPerSecond: 1}, []step{
		{cost: 1, wantAllowed: true, wantRemaining: 2, wantReset: time.Second},
		{cost: 1, wantAllowed: true, wantRemaining: 1, wantReset: 2 * time.Second},
		{cost: 1, wantAllowed: true, wantRemaining: 0, wantReset: 3 * time.Second},
		{cost: 1, wantAllowed: false, wantRemaining: 0, wantRetry: time.Second, wantReset: 3 * time.Second},
		{advance: 999 * time.Millisecond, cost: 1, wantAllowed: false, wantRemaining: 0.999, wantRetry: time.Millisecond, wantReset: 2001 * time.Millisecond},
		{advance: time.Millisecond, cost: 1, wantAllowed: true, wantRemaining: 0, wantReset: 3 * time.Second},
		{advance: 10 * time.Second, cost: 2, wantAllowed: true, wantRemaining: 1, wantReset: 2 * time.Second},
	})
}

func testSubMillisecondRefill(t *testing.T, newStore NewStore) {
	runSteps(t, newStore, bucket.Limit{Capacity: 1, RefillPerSecond: 1000}, []step{
		{cost: 1, wantAllowed: true, wantRemaining: 0, wantReset: time.Millisecond},
		{advance: 250 * time.Microsecond, cost: 0.5, wantAllowed: false, wantRemaining: 0.25, wantRetry: 250 * time.Microsecond, wantReset: 750 * time.Microsecond},
		{advance: 250 * time.Microsecond, cost: 0.5, wantAllowed: true, wantRemaining: 0, wantReset: time.Millisecond},
	})
}

func testFractionalCost(t *testing.T, newStore NewStore) {
	runSteps(t, newStore, bucket.Limit{Capacity: 1, RefillPerSecond: 0.5}, []step{
		{cost: 0.25, wantAllowed: true, wantRemaining: 0.75, wantReset: 500 * time.Millisecond},
		{cost: 0.7, wantAllowed: true, wantRemaining: 0.05, wantReset: 1900 * time.Millisecond},
		{cost: 0.1, wantAllowed: false, wantRemaining: 0.05, wantRetry: 100 * time.Millisecond, wantReset: 1900 * time.Millisecond},
	})
}

func testRefillCapsAtCapacity(t *testing.T, newStore NewStore) {
	runSteps(t, newStore, bucket.Limit{Capacity: 5, RefillPerSecond: 1}, []step{
		{cost: 5, wantAllowed: true, wantRemaining: 0, wantReset: 5 * time.Second},
		{advance: time.Hour, cost: 5, wantAllowed: true, wantRemaining: 0, wantReset: 5 * time.Second},
		{cost: 1, wantAllowed: false, wantRemaining: 0, wantRetry: time.Second, wantReset: 5 * time.Second},
	})
}

func testDenialChangesNothing(t *testing.T, newStore NewStore) {
	// Many denied takes in a row must not push the bucket's recovery back:
	// one second after draining, exactly one token is back.
	steps := []step{{cost: 2, wantAllowed: true, wantRemaining: 0, wantReset: 2 * time.Second}}
	for range 5 {
		steps = append(steps, step{advance: 100 * time.Millisecond, cost: 2, wantAllowed: false})
	}
	for i := 1; i < len(steps); i++ {
		have := 0.1 * float64(i)
		steps[i].wantRemaining = have
		steps[i].wantRetry = time.Duration((2 - have) * float64(time.Second))
		steps[i].wantReset = steps[i].wantRetry
	}
	steps = append(steps, step{advance: 500 * time.Millisecond, cost: 1, wantAllowed: true, wantRemaining: 0, wantReset: 2 * time.Second})
	runSteps(t, newStore, bucket.Limit{Capacity: 2, RefillPerSecond: 1}, steps)
}

func testCostOverCapacity(t *testing.T, newStore NewStore) {
	clock := NewClock(start)
	s := newStore(t, clock)
	d := take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("small", 5, 1, 5.5)}})
	if d.Allowed || !d.OverCapacity() || d.RetryAfter != 0 || d.Buckets[0].RetryAfter != 0 {
		t.Fatalf("cost over capacity: got %+v, want denied, OverCapacity, no RetryAfter", d)
	}
	if b, ok := d.Denying(); !ok || b.Bucket != "small" {
		t.Fatalf("Denying() = %+v, %v; want bucket small", b, ok)
	}
	checkFloat(t, "Remaining", d.Buckets[0].Remaining, 5)
	// Still final after any wait, and the bucket was not touched.
	clock.Advance(24 * time.Hour)
	d = take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("small", 5, 1, 5.5)}})
	if d.Allowed || d.RetryAfter != 0 {
		t.Fatalf("after a day: %+v, want still denied without RetryAfter", d)
	}
	d = take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("small", 5, 1, 5)}})
	if !d.Allowed {
		t.Fatalf("cost equal to capacity denied: %+v", d)
	}
}

func testAllOrNothing(t *testing.T, newStore NewStore) {
	clock := NewClock(start)
	s := newStore(t, clock)
	a, b, c := charge("a", 10, 1, 4), charge("b", 3, 1, 3), charge("c", 100, 10, 1)
	d := take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{b}})
	if !d.Allowed {
		t.Fatalf("draining b: %+v", d)
	}
	// b is empty: a request over a, b and c is denied and charges none.
	d = take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{a, b, c}})
	if d.Allowed {
		t.Fatalf("want denial from b, got %+v", d)
	}
	if !d.Buckets[0].Allowed || d.Buckets[1].Allowed || !d.Buckets[2].Allowed {
		t.Fatalf("per-bucket Allowed = %v %v %v, want true false true", d.Buckets[0].Allowed, d.Buckets[1].Allowed, d.Buckets[2].Allowed)
	}
	checkDuration(t, "RetryAfter", d.RetryAfter, 3*time.Second)
	if den, ok := d.Denying(); !ok || den.Bucket != "b" {
		t.Fatalf("Denying() = %+v, %v; want b", den, ok)
	}
	for i, want := range []float64{10, 0, 100} {
		checkFloat(t, fmt.Sprintf("Buckets[%d].Remaining", i), d.Buckets[i].Remaining, want)
	}
	// Reading a and c at zero cost shows they are still full.
	d = take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("a", 10, 1, 0), charge("c", 100, 10, 0)}})
	checkFloat(t, "a after denial", d.Buckets[0].Remaining, 10)
	checkFloat(t, "c after denial", d.Buckets[1].Remaining, 100)
	// The longest wait wins: after 3s b can pay, and the request goes through.
	clock.Advance(3 * time.Second)
	d = take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{a, b, c}})
	if !d.Allowed {
		t.Fatalf("after RetryAfter: %+v", d)
	}
	for i, want := range []float64{6, 0, 99} {
		checkFloat(t, fmt.Sprintf("Buckets[%d].Remaining", i), d.Buckets[i].Remaining, want)
	}
}

func testZeroCostReads(t *testing.T, newStore NewStore) {
	runSteps(t, newStore, bucket.Limit{Capacity: 4, RefillPerSecond: 2}, []step{
		{cost: 0, wantAllowed: true, wantRemaining: 4},
		{cost: 3, wantAllowed: true, wantRemaining: 1, wantReset: 1500 * time.Millisecond},
		{cost: 0, wantAllowed: true, wantRemaining: 1, wantReset: 1500 * time.Millisecond},
		{advance: 500 * time.Millisecond, cost: 0, wantAllowed: true, wantRemaining: 2, wantReset: time.Second},
		{cost: 0, wantAllowed: true, wantRemaining: 2, wantReset: time.Second},
	})
}

func testAdjustDebtAndRefund(t *testing.T, newStore NewStore) {
	clock := NewClock(start)
	s := newStore(t, clock)
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 2}
	adjust := func(cost float64) bucket.Decision {
		t.Helper()
		d := take(t, s, bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{{Bucket: "tok", Limit: lim, Cost: cost}}})
		if !d.Allowed {
			t.Fatalf("adjust %v denied: %+v", cost, d)
		}
		return d
	}
	get := func(cost float64) bucket.Decision {
		t.Helper()
		return take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{{Bucket: "tok", Limit: lim, Cost: cost}}})
	}
	// Overspending goes into debt instead of being refused.
	d := adjust(14)
	checkFloat(t, "Remaining in debt", d.Buckets[0].Remaining, -4)
	checkDuration(t, "ResetAfter in debt", d.Buckets[0].ResetAfter, 7*time.Second)
	// A take during debt waits for the debt to be paid off first.
	d = get(1)
	if d.Allowed {
		t.Fatalf("take during debt allowed: %+v", d)
	}
	checkDuration(t, "RetryAfter in debt", d.RetryAfter, 2500*time.Millisecond)
	// A refund pays part of the debt back.
	d = adjust(-6)
	checkFloat(t, "Remaining after refund", d.Buckets[0].Remaining, 2)
	// A refund never lifts the bucket above capacity.
	d = adjust(-100)
	checkFloat(t, "Remaining after huge refund", d.Buckets[0].Remaining, 10)
	checkDuration(t, "ResetAfter when full", d.Buckets[0].ResetAfter, 0)
	// Adjusting also refills first.
	adjust(10)
	clock.Advance(time.Second)
	d = adjust(1)
	checkFloat(t, "Remaining after refill and adjust", d.Buckets[0].Remaining, 1)
}

func testIsolation(t *testing.T, newStore NewStore) {
	clock := NewClock(start)
	s := newStore(t, clock)
	drain := charge("b", 1, 0.001, 1)
	take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{drain}})
	for _, req := range []bucket.Request{
		{Subject: "bob", Charges: []bucket.Charge{drain}},
		{Subject: "alice", Charges: []bucket.Charge{charge("other", 1, 0.001, 1)}},
		{Subject: "Alice", Charges: []bucket.Charge{drain}},
	} {
		if d := take(t, s, req); !d.Allowed {
			t.Errorf("%s/%s shares a bucket with alice/b: %+v", req.Subject, req.Charges[0].Bucket, d)
		}
	}
	if d := take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{drain}}); d.Allowed {
		t.Errorf("alice/b was not drained: %+v", d)
	}
}

func testOddSubjects(t *testing.T, newStore NewStore) {
	clock := NewClock(start)
	s := newStore(t, clock)
	subjects := []string{
		"a", "a:b", "a}", "{a}", "a{b}c", "cl:{a}:b", "a\x00b", "a\nb", "  ", "日本語", "\xff\xfe",
		"user:" + strings.Repeat("x", 1<<20), "user:" + strings.Repeat("x", 1<<20-1) + "y",
	}
	drain := func(bucketName string) bucket.Charge { return charge(bucketName, 1, 0.001, 1) }
	// Subject and bucket pairs that a naive "subject:bucket" join would
	// confuse with each other.
	pairs := [][2]string{{"a:b", "c"}, {"a", "b:c"}}
	for _, subj := range subjects {
		if d := take(t, s, bucket.Request{Subject: subj, Charges: []bucket.Charge{drain("b")}}); !d.Allowed {
			t.Fatalf("subject %.40q: first take denied: %+v", subj, d)
		}
	}
	for _, subj := range subjects {
		if d := take(t, s, bucket.Request{Subject: subj, Charges: []bucket.Charge{drain("b")}}); d.Allowed {
			t.Fatalf("subject %.40q: second take allowed, so its bucket is shared or lost", subj)
		}
	}
	for _, p := range pairs {
		if d := take(t, s, bucket.Request{Subject: p[0], Charges: []bucket.Charge{drain(p[1])}}); !d.Allowed {
			t.Fatalf("subject %q bucket %q collides with another bucket", p[0], p[1])
		}
	}
}

func testLimitChange(t *testing.T, newStore NewStore) {
	// Operators retune limits while buckets are in use: the level carries
	// over and is capped by the new capacity.
	clock := NewClock(start)
	s := newStore(t, clock)
	take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 100, 1, 10)}})
	d := take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 50, 1, 1)}})
	checkFloat(t, "Remaining after shrinking capacity", d.Buckets[0].Remaining, 49)
	d = take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 200, 1, 1)}})
	checkFloat(t, "Remaining after growing capacity", d.Buckets[0].Remaining, 48)
}

func testInvalidRequests(t *testing.T, newStore NewStore) {
	s := newStore(t, NewClock(start))
	valid := charge("b", 1, 1, 1)
	many := make([]bucket.Charge, bucket.MaxCharges+1)
	for i := range many {
		many[i] = charge(fmt.Sprint("b", i), 1, 1, 1)
	}
	for _, tc := range []struct {
		name    string
		req     bucket.Request
		wantMsg string
	}{
		{"empty subject", bucket.Request{Charges: []bucket.Charge{valid}}, "subject"},
		{"no charges", bucket.Request{Subject: "a"}, "charges"},
		{"too many charges", bucket.Request{Subject: "a", Charges: many}, "charges"},
		{"empty bucket", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("", 1, 1, 1)}}, "bucket"},
		{"duplicate bucket", bucket.Request{Subject: "a", Charges: []bucket.Charge{valid, valid}}, `"b"`},
		{"zero capacity", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("b", 0, 1, 1)}}, "capacity"},
		{"NaN rate", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("b", 1, math.NaN(), 1)}}, "refill_per_second"},
		{"infinite capacity", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("b", math.Inf(1), 1, 1)}}, "capacity"},
		{"negative cost", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("b", 1, 1, -1)}}, "cost"},
		{"NaN cost", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("b", 1, 1, math.NaN())}}, "cost"},
		{"infinite adjust", bucket.Request{Subject: "a", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{charge("b", 1, 1, math.Inf(-1))}}, "adjustment"},
		{"unknown mode", bucket.Request{Subject: "a", Mode: 7, Charges: []bucket.Charge{valid}}, "mode"},
		{"long id", bucket.Request{Subject: "a", ID: strings.Repeat("i", bucket.MaxIDBytes+1), Charges: []bucket.Charge{valid}}, "id is 129 bytes"},
		{"capacity over MaxTokens", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("b", 1e20, 1, 1)}}, "capacity"},
		{"cost over MaxTokens", bucket.Request{Subject: "a", Charges: []bucket.Charge{charge("b", 1, 1, 1e16)}}, "cost"},
		{"refund over MaxTokens", bucket.Request{Subject: "a", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{charge("b", 1, 1, -1e16)}}, "adjustment"},
		{"negative id window", bucket.Request{Subject: "a", ID: "x", IDWindow: -time.Second, Charges: []bucket.Charge{valid}}, "id window"},
		{"id window over MaxIDWindow", bucket.Request{Subject: "a", ID: "x", IDWindow: bucket.MaxIDWindow + 1, Charges: []bucket.Charge{valid}}, "id window"},
	} {
		_, err := s.Take(t.Context(), tc.req)
		if !errors.Is(err, bucket.ErrInvalidRequest) || !strings.Contains(err.Error(), tc.wantMsg) {
			t.Errorf("%s: err = %v, want ErrInvalidRequest mentioning %q", tc.name, err, tc.wantMsg)
		}
		if bucket.MayHaveApplied(err) {
			t.Errorf("%s: MayHaveApplied(%v) = true for an invalid request", tc.name, err)
		}
	}
}

// testCanceledContext checks that a Take whose context is already done
// fails, changes nothing, and says so.
func testCanceledContext(t *testing.T, newStore NewStore) {
	s := newStore(t, NewClock(start))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	req := bucket.Request{Subject: "a", ID: "canceled", Charges: []bucket.Charge{charge("b", 1, 1, 1)}}
	_, err := s.Take(ctx, req)
	if err == nil {
		t.Fatal("Take with a canceled context succeeded")
	}
	if bucket.MayHaveApplied(err) {
		t.Fatalf("Take with a canceled context: MayHaveApplied(%v) = true, want an error wrapping bucket.ErrNotApplied", err)
	}
	if d := take(t, s, req); !d.Allowed || d.Duplicate || d.Buckets[0].Remaining != 0 {
		t.Fatalf("after a canceled Take, the same request = %+v, want it applied afresh", d)
	}
}

func testConcurrent(t *testing.T, newStore NewStore) {
	// With the clock stopped, exactly Capacity unit takes succeed however
	// they interleave, and a two-bucket request never charges half.
	s := newStore(t, NewClock(start))
	const workers, perWorker, capacity = 32, 20, 150
	var allowed atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perWorker {
				req := bucket.Request{Subject: "shared", Charges: []bucket.Charge{charge("one", capacity, 1e-6, 1), charge("two", capacity*2, 1e-6, 2)}}
				d, err := s.Take(t.Context(), req)
				if err != nil {
					errs <- fmt.Errorf("worker %d: %w", w, err)
					return
				}
				if d.Allowed {
					allowed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := allowed.Load(); got != capacity {
		t.Fatalf("allowed %d takes, want exactly %d", got, capacity)
	}
	d := take(t, s, bucket.Request{Subject: "shared", Charges: []bucket.Charge{charge("one", capacity, 1e-6, 0), charge("two", capacity*2, 1e-6, 0)}})
	if d.Buckets[0].Remaining > epsilon || d.Buckets[1].Remaining > epsilon {
		t.Fatalf("after draining: remaining %v and %v, want 0 and 0", d.Buckets[0].Remaining, d.Buckets[1].Remaining)
	}
}
