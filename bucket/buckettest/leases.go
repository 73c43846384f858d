package buckettest

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// NewLeaseStore returns an empty lease store that reads the present from
// clock, under the rules of [NewStore]: each call returns a store that
// shares no leases with earlier ones, and the suite does not close it.
type NewLeaseStore func(t *testing.T, clock *Clock) bucket.LeaseStore

// RunLeases runs the lease contract suite against stores made by newStore.
// If those stores also implement [bucket.Store], it checks that leases and
// buckets of the same names do not interfere.
func RunLeases(t *testing.T, newStore NewLeaseStore) {
	t.Helper()
	runCases(t, newStore, []testCase[NewLeaseStore]{
		{"LimitHolds", testLeaseLimitHolds},
		{"ReleaseFreesSlot", testLeaseReleaseFreesSlot},
		{"RenewExtends", testLeaseRenewExtends},
		{"ExpiryFreesCrashedHolder", testLeaseExpiryFreesCrashedHolder},
		{"RenewExpired", testLeaseRenewExpired},
		{"ReleaseUnknown", testLeaseReleaseUnknown},
		{"LimitChange", testLeaseLimitChange},
		{"Isolation", testLeaseIsolation},
		{"LeasesAndBucketsAreSeparate", testLeasesAndBuckets},
		{"InvalidRequests", testLeaseInvalidRequests},
		{"CanceledContext", testLeaseCanceledContext},
		{"ConcurrentHoldersNeverExceedLimit", testLeaseConcurrent},
	})
}

// leaseStep is one call in a table-driven lease scenario: advance the
// clock, then acquire (or release) a lease and check the decision.
type leaseStep struct {
	advance time.Duration
	// release releases the lease instead of acquiring it.
	release bool
	// subject and name default to "alice" and "gen"; limit and ttl to the
	// scenario's.
	subject, name, id string
	limit             int
	ttl               time.Duration

	wantAcquired bool
	wantInUse    int
}

func runLeaseSteps(t *testing.T, newStore NewLeaseStore, limit int, ttl time.Duration, steps []leaseStep) {
	t.Helper()
	clock := NewClock(start)
	s := newStore(t, clock)
	for i, st := range steps {
		clock.Advance(st.advance)
		req := bucket.LeaseRequest{Subject: st.subject, Name: st.name, Limit: st.limit, ID: st.id, TTL: st.ttl}
		if req.Subject == "" {
			req.Subject = "alice"
		}
		if req.Name == "" {
			req.Name = "gen"
		}
		if req.Limit == 0 {
			req.Limit = limit
		}
		if req.TTL == 0 {
			req.TTL = ttl
		}
		if st.release {
			if err := s.Release(t.Context(), req.Subject, req.Name, req.ID); err != nil {
				t.Fatalf("step %d: Release(%q, %q, %q): %v", i, req.Subject, req.Name, req.ID, err)
			}
			continue
		}
		d := acquire(t, s, req)
		if d.Acquired != st.wantAcquired || d.InUse != st.wantInUse {
			t.Fatalf("step %d (advance %v, acquire %.20q of %.20q/%.20q, limit %d): Acquired, InUse = %v, %d; want %v, %d",
				i, st.advance, req.ID, req.Subject, req.Name, req.Limit, d.Acquired, d.InUse, st.wantAcquired, st.wantInUse)
		}
	}
}

func acquire(t *testing.T, s bucket.LeaseStore, req bucket.LeaseRequest) bucket.LeaseDecision {
	t.Helper()
	d, err := s.Acquire(t.Context(), req)
	if err != nil {
		t.Fatalf("Acquire(%+.80v): %v", req, err)
	}
	if d.Limit != req.Limit || (d.Acquired && d.InUse < 1) || d.InUse < 0 {
		t.Fatalf("Acquire(%+.80v) = %+v: want Limit echoed and InUse counting an acquired lease", req, d)
	}
	return d
}

func testLeaseLimitHolds(t *testing.T, newStore NewLeaseStore) {
	runLeaseSteps(t, newStore, 3, time.Minute, []leaseStep{
		{id: "a", wantAcquired: true, wantInUse: 1},
		{id: "b", wantAcquired: true, wantInUse: 2},
		{id: "c", wantAcquired: true, wantInUse: 3},
		{id: "d", wantAcquired: false, wantInUse: 3},
		{id: "e", wantAcquired: false, wantInUse: 3},
		// A holder renewing is not a new holder.
		{id: "c", wantAcquired: true, wantInUse: 3},
	})
}

func testLeaseReleaseFreesSlot(t *testing.T, newStore NewLeaseStore) {
	runLeaseSteps(t, newStore, 2, time.Minute, []leaseStep{
		{id: "a", wantAcquired: true, wantInUse: 1},
		{id: "b", wantAcquired: true, wantInUse: 2},
		{id: "c", wantAcquired: false, wantInUse: 2},
		{release: true, id: "a"},
		{id: "c", wantAcquired: true, wantInUse: 2},
		// Releasing twice frees one slot, not two.
		{release: true, id: "a"},
		{id: "d", wantAcquired: false, wantInUse: 2},
		{release: true, id: "b"},
		{release: true, id: "c"},
		{id: "d", wantAcquired: true, wantInUse: 1},
	})
}

func testLeaseRenewExtends(t *testing.T, newStore NewLeaseStore) {
	runLeaseSteps(t, newStore, 1, 10*time.Second, []leaseStep{
		{id: "a", wantAcquired: true, wantInUse: 1},
		{advance: 8 * time.Second, id: "a", wantAcquired: true, wantInUse: 1},
		// a was acquired 16 s ago with a 10 s TTL, but renewed 8 s ago.
		{advance: 8 * time.Second, id: "b", wantAcquired: false, wantInUse: 1},
		{advance: 2*time.Second - time.Microsecond, id: "b", wantAcquired: false, wantInUse: 1},
		{advance: time.Microsecond, id: "b", wantAcquired: true, wantInUse: 1},
		// A renewal may change the TTL.
		{id: "b", ttl: time.Hour, wantAcquired: true, wantInUse: 1},
		{advance: 59 * time.Minute, id: "c", wantAcquired: false, wantInUse: 1},
		{advance: time.Minute, id: "c", wantAcquired: true, wantInUse: 1},
	})
}

func testLeaseExpiryFreesCrashedHolder(t *testing.T, newStore NewLeaseStore) {
	// a and b belong to an instance that died without releasing them.
	runLeaseSteps(t, newStore, 2, 5*time.Second, []leaseStep{
		{id: "a", wantAcquired: true, wantInUse: 1},
		{advance: time.Second, id: "b", wantAcquired: true, wantInUse: 2},
		{id: "c", wantAcquired: false, wantInUse: 2},
		{advance: 4*time.Second - time.Microsecond, id: "c", wantAcquired: false, wantInUse: 2},
		// a expires exactly TTL after it was acquired; b a second later.
		{advance: time.Microsecond, id: "c", wantAcquired: true, wantInUse: 2},
		{id: "d", wantAcquired: false, wantInUse: 2},
		{advance: time.Second, id: "d", wantAcquired: true, wantInUse: 2},
		{advance: time.Hour, id: "e", wantAcquired: true, wantInUse: 1},
	})
}

func testLeaseRenewExpired(t *testing.T, newStore NewLeaseStore) {
	runLeaseSteps(t, newStore, 1, time.Second, []leaseStep{
		{id: "a", wantAcquired: true, wantInUse: 1},
		{advance: time.Second, id: "b", wantAcquired: true, wantInUse: 1},
		// a's lease expired and b took its slot: a cannot renew it.
		{id: "a", wantAcquired: false, wantInUse: 1},
		{release: true, id: "b"},
		// With the slot free, renewing an expired lease acquires it anew.
		{id: "a", wantAcquired: true, wantInUse: 1},
		{advance: 2 * time.Second, id: "a", wantAcquired: true, wantInUse: 1},
		{id: "b", wantAcquired: false, wantInUse: 1},
	})
}

func testLeaseReleaseUnknown(t *testing.T, newStore NewLeaseStore) {
	runLeaseSteps(t, newStore, 1, time.Second, []leaseStep{
		{release: true, subject: "nobody", id: "x"},
		{release: true, id: "x"},
		{id: "a", wantAcquired: true, wantInUse: 1},
		{release: true, id: "x"},
		{release: true, name: "other", id: "a"},
		{release: true, subject: "bob", id: "a"},
		{id: "b", wantAcquired: false, wantInUse: 1},
		{advance: time.Second, release: true, id: "a"},
		{release: true, id: "a"},
		{id: "b", wantAcquired: true, wantInUse: 1},
	})
}

func testLeaseLimitChange(t *testing.T, newStore NewLeaseStore) {
	// Lowering a limit denies new leases until enough holders leave, but
	// revokes none: a holder may renew while over the new limit.
	runLeaseSteps(t, newStore, 3, time.Minute, []leaseStep{
		{id: "a", wantAcquired: true, wantInUse: 1},
		{id: "b", wantAcquired: true, wantInUse: 2},
		{id: "c", wantAcquired: true, wantInUse: 3},
		{id: "d", limit: 2, wantAcquired: false, wantInUse: 3},
		{id: "a", limit: 2, wantAcquired: true, wantInUse: 3},
		{release: true, id: "a"},
		{id: "d", limit: 2, wantAcquired: false, wantInUse: 2},
		{release: true, id: "b"},
		{id: "d", limit: 2, wantAcquired: true, wantInUse: 2},
		// Raising it admits more at once.
		{id: "e", limit: 4, wantAcquired: true, wantInUse: 3},
	})
}

func testLeaseIsolation(t *testing.T, newStore NewLeaseStore) {
	steps := []leaseStep{
		{id: "a", wantAcquired: true, wantInUse: 1},
		{id: "b", wantAcquired: false, wantInUse: 1},
		{subject: "bob", id: "b", wantAcquired: true, wantInUse: 1},
		{subject: "bob", id: "a", wantAcquired: false, wantInUse: 1},
		{name: "other", id: "b", wantAcquired: true, wantInUse: 1},
		{subject: "Alice", id: "b", wantAcquired: true, wantInUse: 1},
		{name: "Gen", id: "b", wantAcquired: true, wantInUse: 1},
	}
	// Subjects, names and IDs that look like keys, escapes or each other.
	odd := []string{"a}", "{a}", "}~lease:a", "a}~id:b", "a:b", "a\x00", "\xff\xfe", "日本語", "#a", strings.Repeat("n", bucket.MaxIDBytes)}
	for i, o := range odd {
		steps = append(steps,
			leaseStep{subject: o, id: "a", wantAcquired: true, wantInUse: 1},
			leaseStep{name: o, id: "a", wantAcquired: true, wantInUse: 1},
			leaseStep{name: "odd-ids", id: o, limit: len(odd), wantAcquired: true, wantInUse: i + 1},
		)
	}
	for _, o := range odd {
		steps = append(steps,
			leaseStep{subject: o, id: "b", wantAcquired: false, wantInUse: 1},
			leaseStep{name: o, id: "b", wantAcquired: false, wantInUse: 1},
			leaseStep{name: "odd-ids", id: o, limit: len(odd), wantAcquired: true, wantInUse: len(odd)},
		)
	}
	runLeaseSteps(t, newStore, 1, time.Minute, steps)
}

func testLeasesAndBuckets(t *testing.T, newStore NewLeaseStore) {
	s := newStore(t, NewClock(start))
	buckets, ok := s.(bucket.Store)
	if !ok {
		t.Skip("the lease store is not a bucket.Store")
	}
	skipInProcess(t, buckets)
	// A lease, a bucket and a request ID all named "gen" for one subject
	// live side by side.
	lease := bucket.LeaseRequest{Subject: "alice", Name: "gen", Limit: 1, ID: "gen", TTL: time.Minute}
	acquire(t, s, lease)
	req := bucket.Request{Subject: "alice", ID: "gen", Charges: []bucket.Charge{charge("gen", 1, 1e-6, 1)}}
	if d := take(t, buckets, req); !d.Allowed || d.Duplicate {
		t.Fatalf("take from bucket gen with ID gen: %+v, want applied", d)
	}
	if d := take(t, buckets, req); !d.Duplicate {
		t.Fatalf("repeated take: %+v, want a duplicate", d)
	}
	req.ID = "gen2"
	if d := take(t, buckets, req); d.Allowed {
		t.Fatalf("take from drained bucket gen: %+v, want denied", d)
	}
	if d := acquire(t, s, bucket.LeaseRequest{Subject: "alice", Name: "gen", Limit: 1, ID: "other", TTL: time.Minute}); d.Acquired || d.InUse != 1 {
		t.Fatalf("second lease of gen: %+v, want denied with 1 in use", d)
	}
	if d := acquire(t, s, lease); !d.Acquired || d.InUse != 1 {
		t.Fatalf("renewing lease gen: %+v, want acquired with 1 in use", d)
	}
}

func testLeaseInvalidRequests(t *testing.T, newStore NewLeaseStore) {
	s := newStore(t, NewClock(start))
	valid := bucket.LeaseRequest{Subject: "a", Name: "n", Limit: 1, ID: "i", TTL: time.Second}
	with := func(f func(*bucket.LeaseRequest)) bucket.LeaseRequest {
		r := valid
		f(&r)
		return r
	}
	long := strings.Repeat("i", bucket.MaxIDBytes+1)
	for _, tc := range []struct {
		name    string
		req     bucket.LeaseRequest
		wantMsg string
	}{
		{"empty subject", with(func(r *bucket.LeaseRequest) { r.Subject = "" }), "subject is empty"},
		{"empty name", with(func(r *bucket.LeaseRequest) { r.Name = "" }), "name is empty"},
		{"zero limit", with(func(r *bucket.LeaseRequest) { r.Limit = 0 }), "limit must be at least 1, got 0"},
		{"negative limit", with(func(r *bucket.LeaseRequest) { r.Limit = -3 }), "limit must be at least 1, got -3"},
		{"empty id", with(func(r *bucket.LeaseRequest) { r.ID = "" }), "id is empty"},
		{"long id", with(func(r *bucket.LeaseRequest) { r.ID = long }), "id is 129 bytes"},
		{"zero ttl", with(func(r *bucket.LeaseRequest) { r.TTL = 0 }), "ttl must be greater than 0, got 0s"},
		{"negative ttl", with(func(r *bucket.LeaseRequest) { r.TTL = -time.Second }), "ttl must be greater than 0, got -1s"},
	} {
		if _, err := s.Acquire(t.Context(), tc.req); !errors.Is(err, bucket.ErrInvalidRequest) || !strings.Contains(err.Error(), tc.wantMsg) {
			t.Errorf("Acquire with %s: err = %v, want ErrInvalidRequest mentioning %q", tc.name, err, tc.wantMsg)
		}
	}
	for _, tc := range []struct {
		name               string
		subject, lease, id string
		wantMsg            string
	}{
		{"empty subject", "", "n", "i", "subject is empty"},
		{"empty name", "a", "", "i", "name is empty"},
		{"empty id", "a", "n", "", "id is empty"},
		{"long id", "a", "n", long, "id is 129 bytes"},
	} {
		if err := s.Release(t.Context(), tc.subject, tc.lease, tc.id); !errors.Is(err, bucket.ErrInvalidRequest) || !strings.Contains(err.Error(), tc.wantMsg) {
			t.Errorf("Release with %s: err = %v, want ErrInvalidRequest mentioning %q", tc.name, err, tc.wantMsg)
		}
	}
	// The longest ID is valid.
	acquire(t, s, with(func(r *bucket.LeaseRequest) { r.ID = long[1:] }))
}

func testLeaseCanceledContext(t *testing.T, newStore NewLeaseStore) {
	s := newStore(t, NewClock(start))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := s.Acquire(ctx, bucket.LeaseRequest{Subject: "a", Name: "n", Limit: 1, ID: "i", TTL: time.Second}); err == nil {
		t.Error("Acquire with a canceled context succeeded")
	}
	if err := s.Release(ctx, "a", "n", "i"); err == nil {
		t.Error("Release with a canceled context succeeded")
	}
}

func testLeaseConcurrent(t *testing.T, newStore NewLeaseStore) {
	// Many callers acquire, hold and release leases of one limit. The
	// suite counts holders itself, from just after Acquire returns to just
	// before Release is called, an interval within the lease's life: there
	// must never be more than the limit.
	s := newStore(t, NewClock(start))
	const workers, perWorker, limit = 24, 20, 4
	var holders, most, acquired atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := range perWorker {
				req := bucket.LeaseRequest{Subject: "shared", Name: "streams", Limit: limit, ID: fmt.Sprintf("%d/%d", w, i), TTL: time.Hour}
				d, err := s.Acquire(t.Context(), req)
				if err != nil {
					errs <- err
					return
				}
				if d.InUse > limit || (d.Acquired && d.InUse < 1) {
					errs <- fmt.Errorf("Acquire(%s) = %+v: InUse out of range", req.ID, d)
					return
				}
				if !d.Acquired {
					continue
				}
				n := holders.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				acquired.Add(1)
				runtime.Gosched()
				holders.Add(-1)
				if err := s.Release(t.Context(), req.Subject, req.Name, req.ID); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d of %d acquisitions succeeded; at most %d holders at once", acquired.Load(), workers*perWorker, most.Load())
	if most.Load() > limit {
		t.Fatalf("%d holders at once, limit %d", most.Load(), limit)
	}
	if acquired.Load() == 0 {
		t.Fatal("no lease was acquired")
	}
	// Everyone released: the next caller is alone.
	if d := acquire(t, s, bucket.LeaseRequest{Subject: "shared", Name: "streams", Limit: limit, ID: "last", TTL: time.Hour}); !d.Acquired || d.InUse != 1 {
		t.Fatalf("after every release: %+v, want acquired alone", d)
	}
}
