package buckettest

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// idStep is one call in a table-driven idempotency scenario: advance the
// clock, send a request with an ID, and check the decision.
type idStep struct {
	advance time.Duration
	// subject defaults to "alice".
	subject string
	mode    bucket.Mode
	id      string
	window  time.Duration
	cost    float64

	wantAllowed   bool
	wantDuplicate bool
	wantRemaining float64
}

func runIDSteps(t *testing.T, newStore NewStore, limit bucket.Limit, steps []idStep) {
	t.Helper()
	clock := NewClock(start)
	s := newStore(t, clock)
	skipInProcess(t, s)
	for i, st := range steps {
		clock.Advance(st.advance)
		subject := st.subject
		if subject == "" {
			subject = "alice"
		}
		req := bucket.Request{Subject: subject, Mode: st.mode, ID: st.id, IDWindow: st.window, Charges: []bucket.Charge{{Bucket: "tok", Limit: limit, Cost: st.cost}}}
		d := take(t, s, req)
		label := fmt.Sprintf("step %d (advance %v, %s %v for %s with ID %.20q)", i, st.advance, st.mode, st.cost, subject, st.id)
		if d.Allowed != st.wantAllowed || d.Duplicate != st.wantDuplicate {
			t.Fatalf("%s: Allowed, Duplicate = %v, %v; want %v, %v (decision %+v)", label, d.Allowed, d.Duplicate, st.wantAllowed, st.wantDuplicate, d)
		}
		b := d.Buckets[0]
		checkFloat(t, label+" Remaining", b.Remaining, st.wantRemaining)
		if st.wantDuplicate {
			// A duplicate reads the bucket as a zero-cost request would.
			if !b.Allowed || d.RetryAfter != 0 || b.RetryAfter != 0 {
				t.Fatalf("%s: duplicate %+v, want every bucket allowed without RetryAfter", label, d)
			}
			if want := limit.TimeToFull(b.Remaining); b.ResetAfter != want {
				t.Fatalf("%s: duplicate ResetAfter = %v, want %v", label, b.ResetAfter, want)
			}
		}
	}
}

// skipInProcess skips the test for a store that keeps its state in this
// process: it never loses a reply, so nothing it applied is ever resent,
// and it need not remember request IDs (see bucket.InProcess).
func skipInProcess(t *testing.T, s bucket.Store) {
	t.Helper()
	if bucket.IsInProcess(s) {
		t.Skip("in-process store: it never loses a reply, so it need not remember request IDs")
	}
}

func testIdempotentAdjust(t *testing.T, newStore NewStore) {
	adjust := bucket.ModeAdjust
	runIDSteps(t, newStore, bucket.Limit{Capacity: 10, RefillPerSecond: 1}, []idStep{
		{mode: adjust, id: "settle-1", cost: 4, wantAllowed: true, wantRemaining: 6},
		{mode: adjust, id: "settle-1", cost: 4, wantAllowed: true, wantDuplicate: true, wantRemaining: 6},
		// The ID alone identifies the request, whatever it charges.
		{mode: adjust, id: "settle-1", cost: -100, wantAllowed: true, wantDuplicate: true, wantRemaining: 6},
		{mode: bucket.ModeTake, id: "settle-1", cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 6},
		{mode: adjust, id: "settle-2", cost: 10, wantAllowed: true, wantRemaining: -4},
		// A duplicate in debt is still allowed: it was applied before.
		{mode: adjust, id: "settle-2", cost: 10, wantAllowed: true, wantDuplicate: true, wantRemaining: -4},
		// A duplicate reports the level refilled to the present.
		{advance: 2 * time.Second, mode: adjust, id: "settle-2", cost: 10, wantAllowed: true, wantDuplicate: true, wantRemaining: -2},
		// A refund with an ID is applied once, and never above capacity.
		{mode: adjust, id: "refund-1", cost: -20, wantAllowed: true, wantRemaining: 10},
		{mode: adjust, id: "settle-3", cost: 3, wantAllowed: true, wantRemaining: 7},
		{mode: adjust, id: "refund-1", cost: -20, wantAllowed: true, wantDuplicate: true, wantRemaining: 7},
		// Without an ID, nothing is ever a duplicate.
		{mode: adjust, cost: 1, wantAllowed: true, wantRemaining: 6},
		{mode: adjust, cost: 1, wantAllowed: true, wantRemaining: 5},
	})
}

func testIdempotentTake(t *testing.T, newStore NewStore) {
	runIDSteps(t, newStore, bucket.Limit{Capacity: 3, RefillPerSecond: 1}, []idStep{
		{id: "call-1", cost: 2, wantAllowed: true, wantRemaining: 1},
		{id: "call-1", cost: 2, wantAllowed: true, wantDuplicate: true, wantRemaining: 1},
		{id: "call-2", cost: 1, wantAllowed: true, wantRemaining: 0},
		// The ID is checked before the decision: a duplicate is allowed
		// even when its bucket could not pay now.
		{id: "call-1", cost: 2, wantAllowed: true, wantDuplicate: true, wantRemaining: 0},
		{advance: 500 * time.Millisecond, id: "call-2", cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 0.5},
		// A zero-cost read with an ID is recorded like any applied take.
		{id: "read-1", wantAllowed: true, wantRemaining: 0.5},
		{id: "read-1", wantAllowed: true, wantDuplicate: true, wantRemaining: 0.5},
	})
}

func testDeniedTakeRecordsNoID(t *testing.T, newStore NewStore) {
	runIDSteps(t, newStore, bucket.Limit{Capacity: 2, RefillPerSecond: 1}, []idStep{
		{id: "drain", cost: 2, wantAllowed: true, wantRemaining: 0},
		{id: "call-1", cost: 1, wantAllowed: false, wantRemaining: 0},
		{advance: 500 * time.Millisecond, id: "call-1", cost: 1, wantAllowed: false, wantRemaining: 0.5},
		// Denied twice, call-1 was never recorded: once the bucket can pay,
		// the same ID is applied, and only then is a repeat a duplicate.
		{advance: 500 * time.Millisecond, id: "call-1", cost: 1, wantAllowed: true, wantRemaining: 0},
		{id: "call-1", cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 0},
		{id: "call-2", cost: 1, wantAllowed: false, wantRemaining: 0},
	})
}

// testTakeResentAsAdjust is how the interceptor resolves a take whose
// outcome was unknown: it resends it as an adjustment with the same ID,
// which charges it exactly once whether or not the first one was applied.
func testTakeResentAsAdjust(t *testing.T, newStore NewStore) {
	runIDSteps(t, newStore, bucket.Limit{Capacity: 10, RefillPerSecond: 1e-9}, []idStep{
		// Applied, reply lost: the resend is a duplicate.
		{id: "lost-reply", cost: 4, wantAllowed: true, wantRemaining: 6},
		{mode: bucket.ModeAdjust, id: "lost-reply", cost: 4, wantAllowed: true, wantDuplicate: true, wantRemaining: 6},
		// Never applied (lost on its way): the resend charges it, into
		// debt if need be, and a late copy of the take is a duplicate.
		{mode: bucket.ModeAdjust, id: "lost-request", cost: 8, wantAllowed: true, wantRemaining: -2},
		{id: "lost-request", cost: 8, wantAllowed: true, wantDuplicate: true, wantRemaining: -2},
	})
}

func testIDExpires(t *testing.T, newStore NewStore) {
	// The refill is too slow to see over a window (6e-7 tokens).
	adjust := bucket.ModeAdjust
	window := bucket.DefaultIDWindow
	runIDSteps(t, newStore, bucket.Limit{Capacity: 10, RefillPerSecond: 1e-9}, []idStep{
		{mode: adjust, id: "x", cost: 1, wantAllowed: true, wantRemaining: 9},
		{advance: window - time.Microsecond, mode: adjust, id: "x", cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 9},
		// Once the window has passed, the ID is forgotten: the request is
		// applied as a new one, and recorded again from now.
		{advance: time.Microsecond, mode: adjust, id: "x", cost: 1, wantAllowed: true, wantRemaining: 8},
		{advance: window - time.Microsecond, mode: adjust, id: "x", cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 8},
		{advance: time.Microsecond, mode: adjust, id: "x", cost: 1, wantAllowed: true, wantRemaining: 7},
		{advance: 24 * time.Hour, mode: adjust, id: "x", cost: 1, wantAllowed: true, wantRemaining: 6.0000864},
	})
}

// testIDWindow checks that Request.IDWindow sets how long an ID is
// remembered, per request.
func testIDWindow(t *testing.T, newStore NewStore) {
	adjust := bucket.ModeAdjust
	const short, long = 30 * time.Second, 45 * time.Minute
	runIDSteps(t, newStore, bucket.Limit{Capacity: 10, RefillPerSecond: 1e-12}, []idStep{
		{mode: adjust, id: "short", window: short, cost: 1, wantAllowed: true, wantRemaining: 9},
		{mode: adjust, id: "long", window: long, cost: 1, wantAllowed: true, wantRemaining: 8},
		{advance: short - time.Microsecond, mode: adjust, id: "short", window: short, cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 8},
		{advance: time.Microsecond, mode: adjust, id: "short", window: short, cost: 1, wantAllowed: true, wantRemaining: 7},
		{advance: long - short - time.Microsecond, mode: adjust, id: "long", window: long, cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 7},
		{advance: time.Microsecond, mode: adjust, id: "long", window: long, cost: 1, wantAllowed: true, wantRemaining: 6},
	})
}

func testIDsAreIndependent(t *testing.T, newStore NewStore) {
	adjust := bucket.ModeAdjust
	long := strings.Repeat("i", bucket.MaxIDBytes)
	steps := []idStep{
		{mode: adjust, id: "a", cost: 1, wantAllowed: true, wantRemaining: 99},
		{mode: adjust, id: "b", cost: 1, wantAllowed: true, wantRemaining: 98},
		{mode: adjust, id: "A", cost: 1, wantAllowed: true, wantRemaining: 97},
		// The same ID for another subject is another request.
		{subject: "bob", mode: adjust, id: "a", cost: 1, wantAllowed: true, wantRemaining: 99},
		{subject: "bob", mode: adjust, id: "a", cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: 99},
	}
	// IDs that look like keys, escapes or each other; each applies once.
	remaining := 97.0
	odd := []string{"a}", "{a}", "}~id:a", "a:b", "a\x00", "\xff\xfe", "日本語", long, long[1:] + "j", "#a"}
	for _, id := range odd {
		remaining--
		steps = append(steps, idStep{mode: adjust, id: id, cost: 1, wantAllowed: true, wantRemaining: remaining})
	}
	for _, id := range append(odd, "a", "b", "A") {
		steps = append(steps, idStep{mode: adjust, id: id, cost: 1, wantAllowed: true, wantDuplicate: true, wantRemaining: remaining})
	}
	runIDSteps(t, newStore, bucket.Limit{Capacity: 100, RefillPerSecond: 1e-9}, steps)
}

// testSettleIsExact is how the interceptor settles calls: take an estimate,
// then adjust by the actual cost minus the estimate, resending each request
// once as if its reply had been lost. Whatever the interleaving, the
// bucket is charged exactly the actual costs of the calls it admitted.
func testSettleIsExact(t *testing.T, newStore NewStore) {
	// The clock is frozen and the refill negligible, so the bucket's
	// capacity minus its final level is what it was charged. The capacity
	// admits about half the calls; the rest are denied and skipped.
	s := newStore(t, NewClock(start))
	skipInProcess(t, s)
	lim := bucket.Limit{Capacity: 5000, RefillPerSecond: 1e-9}
	const workers, perWorker = 8, 25
	var (
		mu               sync.Mutex
		actualSum        float64
		allowedN, denyN  int
		wg               sync.WaitGroup
		errs             = make(chan error, workers)
		subject, tokName = "user:settle", "tokens"
	)
	send := func(mode bucket.Mode, id string, cost float64, wantDuplicate bool) (bucket.Decision, error) {
		req := bucket.Request{Subject: subject, Mode: mode, ID: id, Charges: []bucket.Charge{{Bucket: tokName, Limit: lim, Cost: cost}}}
		d, err := s.Take(t.Context(), req)
		switch {
		case err != nil:
			return d, fmt.Errorf("%s %v with ID %s: %w", mode, cost, id, err)
		case len(d.Buckets) != 1:
			return d, fmt.Errorf("%s %v with ID %s: %d bucket states", mode, cost, id, len(d.Buckets))
		case d.Buckets[0].Remaining > lim.Capacity:
			return d, fmt.Errorf("%s %v with ID %s: Remaining %v above capacity %v", mode, cost, id, d.Buckets[0].Remaining, lim.Capacity)
		case d.Duplicate != wantDuplicate || (wantDuplicate && !d.Allowed):
			return d, fmt.Errorf("%s %v with ID %s: Allowed, Duplicate = %v, %v; want a duplicate: %v", mode, cost, id, d.Allowed, d.Duplicate, wantDuplicate)
		case mode == bucket.ModeAdjust && !d.Allowed:
			return d, fmt.Errorf("%s %v with ID %s: denied", mode, cost, id)
		}
		return d, nil
	}
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 0x5e771e))
			for i := range perWorker {
				estimate, actual := 100*rng.Float64(), 150*rng.Float64()
				id := fmt.Sprintf("%d/%d", w, i)
				d, err := send(bucket.ModeTake, "estimate/"+id, estimate, false)
				if err != nil {
					errs <- err
					return
				}
				if !d.Allowed {
					mu.Lock()
					denyN++
					mu.Unlock()
					continue
				}
				if _, err := send(bucket.ModeTake, "estimate/"+id, estimate, true); err != nil {
					errs <- err
					return
				}
				for attempt := range 2 {
					if _, err := send(bucket.ModeAdjust, "settle/"+id, actual-estimate, attempt > 0); err != nil {
						errs <- err
						return
					}
				}
				mu.Lock()
				actualSum += actual
				allowedN++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	d := take(t, s, bucket.Request{Subject: subject, Charges: []bucket.Charge{{Bucket: tokName, Limit: lim}}})
	charged := lim.Capacity - d.Buckets[0].Remaining
	t.Logf("%d calls settled, %d denied: charged %.9f for actual costs %.9f", allowedN, denyN, charged, actualSum)
	if diff := charged - actualSum; diff > epsilon || diff < -epsilon {
		t.Fatalf("charged %.9f for actual costs %.9f (off by %.3g)", charged, actualSum, diff)
	}
	if allowedN == 0 {
		t.Fatal("no call was admitted")
	}
}
