package memstore

import (
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"
	"unsafe"

	"github.com/connectlimit/connectlimit/bucket"
)

// fakeClock is a clock the test moves by hand; the Store reads it under a
// shard lock, and the test moves it only between calls.
type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time { return c.now }

// held counts the lease sets the Store keeps and the leases in them.
func (s *Store) held() (leaseSets, leases int) {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		leaseSets += len(sh.leases)
		for _, set := range sh.leases {
			leases += len(set)
		}
		sh.mu.Unlock()
	}
	return leaseSets, leases
}

// checkShards fails t unless every shard's entries, index and heap agree:
// each bucket is in all three exactly once and found by its key, every
// entry knows its heap position, every heap key is at most its bucket's
// fullAt, no parent's key is above its children's, the index is at most
// 3/4 full, and no shard is over its bound.
func checkShards(t *testing.T, s *Store) {
	t.Helper()
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		n := len(sh.entries)
		indexed := 0
		for _, is := range sh.index {
			if is.slot != 0 {
				indexed++
				if int(is.slot) > n || sh.entries[is.slot-1].hash != is.hash {
					sh.mu.Unlock()
					t.Fatalf("shard %d: index slot %+v names no entry with its hash", i, is)
				}
			}
		}
		if len(sh.heap) != n || len(sh.keys) != n || indexed != n || n > s.perShard {
			sh.mu.Unlock()
			t.Fatalf("shard %d: %d entries, %d in the heap with %d keys, %d in the index, bound %d", i, n, len(sh.heap), len(sh.keys), indexed, s.perShard)
		}
		if size := len(sh.index); size&(size-1) != 0 || 4*n > 3*size {
			sh.mu.Unlock()
			t.Fatalf("shard %d: index of %d positions holds %d entries", i, size, n)
		}
		for slot, e := range sh.entries {
			if got := sh.find(e.hash, e.key); int(got) != slot {
				sh.mu.Unlock()
				t.Fatalf("shard %d: find(%v) = %d, want slot %d", i, e.key, got, slot)
			}
			if int(e.pos) >= n || int(sh.heap[e.pos]) != slot {
				sh.mu.Unlock()
				t.Fatalf("shard %d: entry %v in slot %d has heap position %d, which holds another", i, e.key, slot, e.pos)
			}
			if k := sh.keys[e.pos]; k > e.fullAt {
				sh.mu.Unlock()
				t.Fatalf("shard %d: entry %v is full at %d, before its heap key %d", i, e.key, e.fullAt, k)
			}
		}
		for pos := 1; pos < n; pos++ {
			if parent := (pos - 1) / 2; sh.keys[parent] > sh.keys[pos] {
				sh.mu.Unlock()
				t.Fatalf("shard %d: heap position %d has key %d, above its child %d's %d", i, parent, sh.keys[parent], pos, sh.keys[pos])
			}
		}
		sh.mu.Unlock()
	}
}

func TestShardSize(t *testing.T) {
	t.Parallel()
	if size := unsafe.Sizeof(shard{}); size%cacheLine != 0 {
		t.Fatalf("a shard is %d bytes, not a multiple of %d", size, cacheLine)
	}
}

func TestEntrySize(t *testing.T) {
	t.Parallel()
	// An entry is one cache line on 64-bit platforms; growing it costs
	// every bucket.
	if size := unsafe.Sizeof(entry{}); unsafe.Sizeof(uintptr(0)) == 8 && size > 64 {
		t.Fatalf("an entry is %d bytes, want at most 64", size)
	}
}

func TestPerShard(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		n    int
		want int
	}{
		{n: -1, want: 1},
		{n: 0, want: 1},
		{n: 1, want: 1},
		{n: 63, want: 1},
		{n: 64, want: 1},
		{n: 65, want: 2},
		{n: 128, want: 2},
		{n: 1000, want: 16},
		{n: DefaultMaxBuckets, want: DefaultMaxBuckets / 64},
		{n: math.MaxInt, want: maxPerShard},
	} {
		if got := perShard(tc.n); got != tc.want {
			t.Errorf("perShard(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
}

// refLevel is a bucket of the reference model: the old, unbounded store.
type refLevel struct {
	tokens float64
	at     time.Time
}

// TestMatchesReference drives a Store and a plain map of levels with the
// same random requests, and checks that they decide alike (the map forgets
// what the Store evicted) and that the shards stay consistent throughout.
func TestMatchesReference(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		max      int
		subjects int
		// maxAdvance is the most the clock moves at once, every tenth
		// step or so.
		maxAdvance time.Duration
		wantEvict  bool
	}{
		{name: "unbounded", max: 1 << 20, subjects: 200, maxAdvance: 3 * time.Second},
		{name: "tight bound", max: 64 * 3, subjects: 400, maxAdvance: 3 * time.Second, wantEvict: true},
		{name: "larger shards", max: 64 * 12, subjects: 5000, maxAdvance: 10 * time.Millisecond, wantEvict: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(1, uint64(tc.max)))
			clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
			s := New(WithClock(clock.Now), WithSweepInterval(0), WithMaxBuckets(tc.max))
			t.Cleanup(func() { _ = s.Close() })
			// refs holds the reference's levels by shard, so that each step
			// checks for evictions in the one shard it changed.
			refs := map[*shard]map[key]refLevel{}
			names := []string{"a", "b", "c", "d"}
			for step := range 20000 {
				switch r := rng.IntN(100); {
				case r < 10:
					clock.now = clock.now.Add(time.Duration(rng.Int64N(int64(tc.maxAdvance))))
				case r < 12:
					s.Sweep()
				}
				subject := fmt.Sprint("user:", rng.IntN(tc.subjects))
				subjectHash := s.subjectHash(subject)
				ref := refs[s.shard(subjectHash)]
				if ref == nil {
					ref = map[key]refLevel{}
					refs[s.shard(subjectHash)] = ref
				}
				req := bucket.Request{Subject: subject}
				if rng.IntN(4) == 0 {
					req.Mode = bucket.ModeAdjust
				}
				for _, i := range rng.Perm(len(names))[:1+rng.IntN(len(names))] {
					lim := bucket.Limit{Capacity: float64(1 + i*3), RefillPerSecond: float64(1 + i)}
					cost := float64(rng.IntN(int(lim.Capacity) + 1))
					if req.Mode == bucket.ModeAdjust && rng.IntN(2) == 0 {
						cost = -cost
					}
					req.Charges = append(req.Charges, bucket.Charge{Bucket: names[i], Limit: lim, Cost: cost})
				}
				got, err := s.Take(t.Context(), req)
				if err != nil {
					t.Fatal(err)
				}
				tokens := make([]float64, len(req.Charges))
				for i, c := range req.Charges {
					tokens[i] = c.Limit.Capacity
					if lv, ok := ref[key{subject, c.Bucket}]; ok {
						tokens[i] = c.Limit.Refill(lv.tokens, clock.now.Sub(lv.at))
					}
				}
				want := bucket.Decide(req, tokens)
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("step %d: %+v\ngot  %+v\nwant %+v", step, req, got, want)
				}
				// The reference follows the Store's decision, so that after
				// an eviction the two compare again from the same levels.
				if got.Allowed {
					for i, c := range req.Charges {
						k := key{subject, c.Bucket}
						if b := got.Buckets[i]; b.Remaining < c.Limit.Capacity {
							ref[k] = refLevel{tokens: b.Remaining, at: clock.now}
						} else {
							delete(ref, k)
						}
					}
				}
				if tc.wantEvict {
					// Forget in the reference what the Store evicted, and
					// the full buckets it dropped to make room.
					for k := range ref {
						h := s.subjectHash(k.subject)
						if s.shard(h).find(s.bucketHash(h, k.name), k) < 0 {
							delete(ref, k)
						}
					}
				}
				if step%499 == 0 {
					checkShards(t, s)
				}
			}
			checkShards(t, s)
			if evicted := s.Evictions() > 0; evicted != tc.wantEvict {
				t.Fatalf("Evictions() = %d, want evictions: %v", s.Evictions(), tc.wantEvict)
			}
		})
	}
}

func TestCompactAfterFlood(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	s := New(WithClock(clock.Now), WithSweepInterval(0))
	t.Cleanup(func() { _ = s.Close() })
	take := func(subject string, cost float64) {
		t.Helper()
		req := bucket.Request{Subject: subject, Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 100, RefillPerSecond: 1}, Cost: cost}}}
		if _, err := s.Take(t.Context(), req); err != nil {
			t.Fatal(err)
		}
	}
	// A flood of short-lived buckets, and a few long-lived ones.
	const flood = 64 * 1000
	for i := range flood {
		take(fmt.Sprint("flood:", i), 1)
	}
	for i := range 100 {
		take(fmt.Sprint("keep:", i), 100)
	}
	clock.now = clock.now.Add(time.Second)
	s.Sweep()
	checkShards(t, s)
	if got := s.Len(); got != 100 {
		t.Fatalf("Len = %d after the flood refilled, want 100", got)
	}
	for i := range s.shards {
		sh := &s.shards[i]
		if c := cap(sh.entries); c > 2*len(sh.entries) {
			t.Fatalf("shard %d keeps room for %d entries after a sweep left %d", i, c, len(sh.entries))
		}
	}
	// The rebuilt shards still hold the long-lived buckets.
	for i := range 100 {
		req := bucket.Request{Subject: fmt.Sprint("keep:", i), Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 100, RefillPerSecond: 1}, Cost: 0}}}
		d, err := s.Take(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		if got := d.Buckets[0].Remaining; got != 1 {
			t.Fatalf("keep:%d holds %v after the rebuild, want 1", i, got)
		}
	}
	checkShards(t, s)
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
		if sets, leases := s.held(); sets != wantSets || leases != wantLeases {
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

// TestLazyHeapKeys drives one shard with charges (which leave heap keys
// stale) and refunds (which lower them), and checks that every eviction
// removes the bucket that is full soonest and every sweep removes exactly
// the buckets that are full, whatever the keys.
func TestLazyHeapKeys(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(2, 3))
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	const bound = 16
	s := New(WithClock(clock.Now), WithSweepInterval(0), WithMaxBuckets(bound*shardCount))
	t.Cleanup(func() { _ = s.Close() })
	sh := &s.shards[0]
	var subjects []string
	for i := 0; len(subjects) < 3*bound; i++ {
		if subject := fmt.Sprint("user:", i); s.shard(s.subjectHash(subject)) == sh {
			subjects = append(subjects, subject)
		}
	}
	lim := bucket.Limit{Capacity: 100, RefillPerSecond: 10}
	fullAts := func() map[key]int64 {
		m := make(map[key]int64, len(sh.entries))
		for _, e := range sh.entries {
			m[e.key] = e.fullAt
		}
		return m
	}
	for step := range 20000 {
		if rng.IntN(10) == 0 {
			clock.now = clock.now.Add(time.Duration(rng.Int64N(int64(time.Second))))
		}
		if rng.IntN(50) == 0 {
			before := fullAts()
			s.Sweep()
			now, after := int64(clock.now.Sub(s.epoch)), fullAts()
			for k, fullAt := range before {
				if _, kept := after[k]; kept != (fullAt > now) {
					t.Fatalf("step %d: %v is full at %d; after the sweep at %d, kept = %v", step, k, fullAt, now, kept)
				}
			}
			continue
		}
		req := bucket.Request{Subject: subjects[rng.IntN(len(subjects))], Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: float64(rng.IntN(60))}}}
		if rng.IntN(3) == 0 {
			req.Mode, req.Charges[0].Cost = bucket.ModeAdjust, -req.Charges[0].Cost
		}
		before, evictions := fullAts(), s.Evictions()
		if _, err := s.Take(t.Context(), req); err != nil {
			t.Fatal(err)
		}
		after := fullAts()
		for k, fullAt := range before {
			if _, kept := after[k]; kept || k.subject == req.Subject {
				continue
			}
			// k was evicted to make room for req's bucket: none was
			// full sooner.
			for other, o := range before {
				if o < fullAt {
					t.Fatalf("step %d: evicted %v, full at %d, before %v, full at %d", step, k, fullAt, other, o)
				}
			}
		}
		if s.Evictions() < evictions {
			t.Fatalf("step %d: Evictions went down", step)
		}
		if step%97 == 0 {
			checkShards(t, s)
		}
	}
	checkShards(t, s)
	if s.Evictions() == 0 {
		t.Fatal("no evictions: the test does not exercise them")
	}
}
