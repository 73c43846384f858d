package memstore

import (
	"fmt"
	"testing"
	"time"
	"unsafe"

	"github.com/connectlimit/connectlimit/bucket"
)

// fakeClock is a clock the test moves by hand; the Store reads it under a
// shard lock, and the test moves it only between calls.
type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time { return c.now }

// held counts what the Store keeps in memory besides buckets: recorded IDs
// (map entries and queued records) and lease sets with their leases.
func (s *Store) held() (ids, queued, leaseSets, leases int) {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		ids += len(sh.ids)
		queued += len(sh.idQueue)
		leaseSets += len(sh.leases)
		for _, set := range sh.leases {
			leases += len(set)
		}
		sh.mu.Unlock()
	}
	return ids, queued, leaseSets, leases
}

func TestShardSize(t *testing.T) {
	t.Parallel()
	if size := unsafe.Sizeof(shard{}); size%cacheLine != 0 {
		t.Fatalf("a shard is %d bytes, not a multiple of %d", size, cacheLine)
	}
}

func TestIDsAreForgotten(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		sweep bool
	}{
		// Without a sweep, the next ID recorded in a shard drops the
		// expired ones.
		{name: "on write"},
		{name: "by sweep", sweep: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
			s := New(WithClock(clock.Now), WithSweepInterval(0))
			t.Cleanup(func() { _ = s.Close() })
			adjust := func(subject, id string) bucket.Decision {
				t.Helper()
				d, err := s.Take(t.Context(), bucket.Request{Subject: subject, Mode: bucket.ModeAdjust, ID: id, Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 1e9, RefillPerSecond: 1}, Cost: 1}}})
				if err != nil {
					t.Fatal(err)
				}
				return d
			}
			// Enough subjects to put IDs in every shard, one repeated.
			const subjects = 1000
			for i := range subjects {
				adjust(fmt.Sprint("user:", i), "settle")
			}
			if d := adjust("user:0", "settle"); !d.Duplicate {
				t.Fatalf("repeat: %+v, want a duplicate", d)
			}
			if ids, queued, _, _ := s.held(); ids != subjects || queued != subjects {
				t.Fatalf("holding %d IDs and %d queued records, want %d of each", ids, queued, subjects)
			}
			clock.now = clock.now.Add(bucket.DefaultIDWindow)
			if tc.sweep {
				s.Sweep()
			} else {
				// One new ID per subject visits every shard.
				for i := range subjects {
					adjust(fmt.Sprint("user:", i), "next")
				}
			}
			want := 0
			if !tc.sweep {
				want = subjects
			}
			if ids, queued, _, _ := s.held(); ids != want || queued != want {
				t.Fatalf("after the window: holding %d IDs and %d queued records, want %d of each", ids, queued, want)
			}
		})
	}
}

func TestIDsSurviveAClockStepBack(t *testing.T) {
	t.Parallel()
	// A clock that steps back queues an ID behind one that expires later.
	// Dropping the older record of an ID recorded again must not forget
	// the newer one.
	const w = bucket.DefaultIDWindow
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	s := New(WithClock(clock.Now), WithSweepInterval(0))
	t.Cleanup(func() { _ = s.Close() })
	for i, tc := range []struct {
		advance       time.Duration
		id            string
		wantDuplicate bool
		wantIDs       int
		wantQueued    int
	}{
		{advance: w / 2, id: "z", wantIDs: 1, wantQueued: 1},
		{advance: -w / 2, id: "x", wantIDs: 2, wantQueued: 2},
		// x expired and is recorded again; z, ahead of it, has not.
		{advance: w, id: "x", wantIDs: 2, wantQueued: 3},
		// z and x's first record are dropped; x's second is kept.
		{advance: w / 2, id: "y", wantIDs: 2, wantQueued: 2},
		{id: "x", wantDuplicate: true, wantIDs: 2, wantQueued: 2},
		{advance: w / 2, id: "x", wantIDs: 2, wantQueued: 2},
	} {
		clock.now = clock.now.Add(tc.advance)
		// Every request has the same subject, so the same shard.
		req := bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, ID: tc.id, Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 100, RefillPerSecond: 1e-9}, Cost: 1}}}
		d, err := s.Take(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		ids, queued, _, _ := s.held()
		if d.Duplicate != tc.wantDuplicate || ids != tc.wantIDs || queued != tc.wantQueued {
			t.Fatalf("step %d (%s): Duplicate %v, %d IDs, %d queued; want %v, %d, %d", i, tc.id, d.Duplicate, ids, queued, tc.wantDuplicate, tc.wantIDs, tc.wantQueued)
		}
	}
}

func TestEmptyLeaseSetsHoldNoMemory(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	s := New(WithClock(clock.Now), WithSweepInterval(0))
	t.Cleanup(func() { _ = s.Close() })
	acquire := func(subject, id string, ttl time.Duration) {
		t.Helper()
		d, err := s.Acquire(t.Context(), bucket.LeaseRequest{Subject: subject, Name: "gen", Limit: 2, ID: id, TTL: ttl})
		if err != nil || !d.Acquired {
			t.Fatalf("Acquire(%s, %s) = %+v, %v", subject, id, d, err)
		}
	}
	check := func(what string, wantSets, wantLeases int) {
		t.Helper()
		if _, _, sets, leases := s.held(); sets != wantSets || leases != wantLeases {
			t.Fatalf("%s: %d lease sets holding %d leases, want %d and %d", what, sets, leases, wantSets, wantLeases)
		}
	}
	for i := range 100 {
		acquire(fmt.Sprint("user:", i), "a", time.Second)
		acquire(fmt.Sprint("user:", i), "b", time.Minute)
	}
	check("after acquiring", 100, 200)
	for i := range 50 {
		for _, id := range []string{"a", "b"} {
			if err := s.Release(t.Context(), fmt.Sprint("user:", i), "gen", id); err != nil {
				t.Fatal(err)
			}
		}
	}
	check("after releasing half the subjects", 50, 100)
	clock.now = clock.now.Add(time.Second)
	s.Sweep()
	check("after the short leases expired", 50, 50)
	clock.now = clock.now.Add(time.Minute)
	// Without a sweep, an access drops a set's expired leases.
	acquire("user:99", "c", time.Second)
	check("after another acquire", 50, 50)
	s.Sweep()
	check("after every lease but one expired", 1, 1)
	if err := s.Release(t.Context(), "user:99", "gen", "c"); err != nil {
		t.Fatal(err)
	}
	check("after the last release", 0, 0)
}
