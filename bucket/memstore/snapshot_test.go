package memstore

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// shardOf returns the shard that holds subject's buckets.
func (s *Store) shardOf(subject string) *shard {
	return s.shard(s.subjectHash(subject))
}

// takeWhileLocked runs a Take of one charge while the test holds the lock
// of the subject's shard, and reports whether it returned within wait,
// before the lock was released (decided from the shard's snapshot), and
// what it returned.
func takeWhileLocked(t *testing.T, s *Store, req bucket.Request, wait time.Duration) (unlocked bool, d bucket.Decision) {
	t.Helper()
	sh := s.shardOf(req.Subject)
	sh.mu.Lock()
	done := make(chan bucket.Decision, 1)
	go func() {
		d, err := s.Take(context.Background(), req)
		if err != nil {
			t.Error(err)
		}
		done <- d
	}()
	select {
	case d = <-done:
		sh.mu.Unlock()
		return true, d
	case <-time.After(wait):
		// Still waiting for the lock, or slow to start: either way it was
		// not decided without the lock by now.
	}
	sh.mu.Unlock()
	return false, <-done
}

// TestSnapshotDeniesWithoutLock checks that two calls in a row denied by a
// bucket make the calls that follow them, which that bucket cannot pay
// either, denied without the shard's lock, with the decision the locked
// path makes, and
// that whatever changes the bucket (a refund, a take, an eviction) or lets
// it pay (refill) sends calls through the lock again.
func TestSnapshotDeniesWithoutLock(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{now: time.Unix(1000, 0)}
	s := New(WithClock(clock.Now), WithSweepInterval(0), WithMaxBuckets(1))
	ctx := context.Background()
	lim := bucket.Limit{Capacity: 3, RefillPerSecond: 1}
	req := func(subject string, mode bucket.Mode, cost float64, l bucket.Limit) bucket.Request {
		return bucket.Request{Subject: subject, Mode: mode, Charges: []bucket.Charge{{Bucket: "b", Limit: l, Cost: cost}}}
	}
	// A call expected to be decided without the lock gets plenty of time
	// to return (it fails the test only if it does not); one expected to
	// wait gets a short while to show that it does not return.
	const unlockedWithin, lockedFor = 10 * time.Second, 50 * time.Millisecond
	take := func(r bucket.Request) bucket.Decision {
		t.Helper()
		d, err := s.Take(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	const alice = "user:alice"
	for range 3 {
		if d := take(req(alice, bucket.ModeTake, 1, lim)); !d.Allowed {
			t.Fatalf("take from a full bucket denied: %+v", d)
		}
	}
	// deny has r denied twice in a row, under the lock: the second denial
	// takes the snapshot.
	deny := func(r bucket.Request) {
		t.Helper()
		for range 2 {
			if d := take(r); d.Allowed {
				t.Fatalf("take that the bucket cannot pay allowed: %+v", d)
			}
		}
	}
	// Denied once, under the lock: no snapshot yet, so the next call,
	// denied again, waits for the lock, and takes the snapshot.
	if d := take(req(alice, bucket.ModeTake, 1, lim)); d.Allowed {
		t.Fatalf("take from an empty bucket allowed: %+v", d)
	}
	if unlocked, d := takeWhileLocked(t, s, req(alice, bucket.ModeTake, 1, lim), lockedFor); unlocked || d.Allowed {
		t.Fatalf("take after one denial: without the lock %v, %+v; want denied, under the lock", unlocked, d)
	}
	for _, cost := range []float64{1, 0.5, 4} {
		r := req(alice, bucket.ModeTake, cost, lim)
		unlocked, d := takeWhileLocked(t, s, r, unlockedWithin)
		if !unlocked {
			t.Fatalf("take of %v from the bucket just denied waited for the lock", cost)
		}
		if want := bucket.Decide(r, []float64{0}); fmt.Sprint(d) != fmt.Sprint(want) {
			t.Fatalf("take of %v decided from the snapshot: %+v, want %+v", cost, d, want)
		}
	}
	// Another subject's calls never use alice's snapshot, in her shard or
	// another. (Bob's bucket, which would be full first, is not added to
	// a shard at its bound of one bucket: his call changes nothing.)
	sameShard, otherShard := "", ""
	for i := 0; sameShard == "" || otherShard == ""; i++ {
		if c := fmt.Sprint("user:", i); s.shardOf(c) == s.shardOf(alice) {
			sameShard = c
		} else {
			otherShard = c
		}
	}
	for _, bob := range []string{sameShard, otherShard} {
		if unlocked, _ := takeWhileLocked(t, s, req(bob, bucket.ModeTake, 1, lim), lockedFor); unlocked {
			t.Fatalf("take of %s, in another shard %v, was decided without the lock", bob, bob == otherShard)
		}
	}
	evictions := s.Evictions()
	// Half a second of refill does not pay 1 token: still denied without
	// the lock, with the refill counted.
	clock.now = clock.now.Add(500 * time.Millisecond)
	if unlocked, d := takeWhileLocked(t, s, req(alice, bucket.ModeTake, 1, lim), unlockedWithin); !unlocked || d.Allowed || d.Buckets[0].Remaining != 0.5 {
		t.Fatalf("take after 0.5 s of refill: without the lock %v, %+v; want denied with 0.5 left, without the lock", unlocked, d)
	}
	// A second of refill pays it: the call takes the lock to write.
	clock.now = clock.now.Add(500 * time.Millisecond)
	if unlocked, d := takeWhileLocked(t, s, req(alice, bucket.ModeTake, 1, lim), lockedFor); unlocked || !d.Allowed {
		t.Fatalf("take after 1 s of refill: without the lock %v, %+v; want allowed, under the lock", unlocked, d)
	}
	// Denied again (snapshot), then refunded: the refund writes the
	// bucket, and the next take is decided under the lock, and allowed.
	deny(req(alice, bucket.ModeTake, 1, lim))
	if d := take(req(alice, bucket.ModeAdjust, -1, lim)); !d.Allowed {
		t.Fatalf("refund: %+v", d)
	}
	if unlocked, d := takeWhileLocked(t, s, req(alice, bucket.ModeTake, 1, lim), lockedFor); unlocked || !d.Allowed {
		t.Fatalf("take after a refund: without the lock %v, %+v; want allowed, under the lock", unlocked, d)
	}
	// Denied again; a millisecond later, a take at a higher rate (another
	// tier) of the same bucket is decided with its own limit, which has
	// refilled it, and writes it.
	deny(req(alice, bucket.ModeTake, 1, lim))
	clock.now = clock.now.Add(time.Millisecond)
	rich := bucket.Limit{Capacity: 3, RefillPerSecond: 1e6}
	if unlocked, d := takeWhileLocked(t, s, req(alice, bucket.ModeTake, 1, rich), lockedFor); unlocked || !d.Allowed {
		t.Fatalf("take at a higher rate: without the lock %v, %+v; want allowed, under the lock", unlocked, d)
	}
	// Denied again, then evicted: the Store holds one bucket per shard,
	// and a subject of the same shard whose bucket will be full later
	// takes its place. Alice's bucket is forgotten, so full, and her next
	// take is allowed.
	deny(req(alice, bucket.ModeTake, 3, lim))
	if d := take(req(sameShard, bucket.ModeTake, 100, bucket.Limit{Capacity: 100, RefillPerSecond: 1})); !d.Allowed || s.Evictions() != evictions+1 {
		t.Fatalf("take of a bucket that evicts alice's: %+v, %d evictions, want %d", d, s.Evictions(), evictions+1)
	}
	if d := take(req(alice, bucket.ModeTake, 3, lim)); !d.Allowed {
		t.Fatalf("take of 3 after alice's bucket was evicted: %+v, want allowed (full)", d)
	}
}

// TestSnapshotExactUnderConcurrency has callers hammer one bucket, which
// refunds refill while they do, on a clock that stands still: every token
// the bucket ever holds is taken, none twice, whether a call was decided
// from the snapshot or under the lock. Run with -race, it also checks the
// snapshot's sequence lock.
func TestSnapshotExactUnderConcurrency(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{now: time.Unix(1000, 0)}
	s := New(WithClock(clock.Now), WithSweepInterval(0))
	ctx := context.Background()
	// A capacity that the refunds never fill up to, which would cap them.
	lim := bucket.Limit{Capacity: 1000, RefillPerSecond: 1}
	req := func(mode bucket.Mode, cost float64) bucket.Request {
		return bucket.Request{Subject: "user:hot", Mode: mode, Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: cost}}}
	}
	const (
		callers = 8
		refunds = 200
	)
	var allowed atomic.Int64
	var refunding atomic.Bool
	refunding.Store(true)
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			// Keep taking until the refunds are over and this caller has
			// been denied many times since: every token refunded has been
			// taken by then.
			for denials := 0; denials < 1000; {
				over := !refunding.Load()
				d, err := s.Take(ctx, req(bucket.ModeTake, 1))
				if err != nil {
					t.Error(err)
					return
				}
				if d.Allowed {
					allowed.Add(1)
				} else if over {
					denials++
				}
			}
		})
	}
	// The refunds start once the callers have emptied the bucket.
	for allowed.Load() < int64(lim.Capacity) {
		time.Sleep(time.Millisecond)
	}
	for range refunds {
		if _, err := s.Take(ctx, req(bucket.ModeAdjust, -1)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Microsecond)
	}
	refunding.Store(false)
	wg.Wait()
	if got, want := allowed.Load(), int64(lim.Capacity)+refunds; got != want {
		t.Fatalf("%d takes allowed, want %d: the capacity and every refund, once", got, want)
	}
}

// TestSnapshotOfSeveralBuckets checks the snapshot of a request of several
// charges: denied twice in a row, the same request is denied from it with
// the decision the locked path makes (every bucket's state, not only the
// one that cannot pay); a request of other buckets, or of the same buckets
// in another order, takes the lock; and a write to any of its buckets,
// including one that could pay, sends the request through the lock again.
func TestSnapshotOfSeveralBuckets(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{now: time.Unix(1000, 0)}
	s := New(WithClock(clock.Now), WithSweepInterval(0))
	ctx := context.Background()
	const unlockedWithin, lockedFor = 10 * time.Second, 50 * time.Millisecond
	const alice = "user:alice"
	small := bucket.Limit{Capacity: 2, RefillPerSecond: 1}
	large := bucket.Limit{Capacity: 100, RefillPerSecond: 1}
	pair := func(names ...string) bucket.Request {
		r := bucket.Request{Subject: alice}
		for _, n := range names {
			l := large
			if n == "small" {
				l = small
			}
			r.Charges = append(r.Charges, bucket.Charge{Bucket: n, Limit: l, Cost: 1})
		}
		return r
	}
	take := func(r bucket.Request) bucket.Decision {
		t.Helper()
		d, err := s.Take(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	// Two takes empty "small" (and charge "large" twice); the next two are
	// denied by "small", under the lock: the second takes the snapshot.
	req := pair("large", "small")
	for range 2 {
		if d := take(req); !d.Allowed {
			t.Fatalf("take: %+v, want allowed", d)
		}
	}
	var locked bucket.Decision
	for range 2 {
		if locked = take(req); locked.Allowed {
			t.Fatalf("take from an empty bucket: %+v, want denied", locked)
		}
	}
	unlocked, d := takeWhileLocked(t, s, req, unlockedWithin)
	if !unlocked {
		t.Fatal("the request just denied twice waited for the lock")
	}
	if fmt.Sprint(d) != fmt.Sprint(locked) {
		t.Fatalf("decided from the snapshot: %+v, want the locked path's %+v", d, locked)
	}
	// Other buckets, or the same in another order: the lock.
	for _, r := range []bucket.Request{pair("small", "large"), pair("large"), pair("large", "small", "other")} {
		if unlocked, _ := takeWhileLocked(t, s, r, lockedFor); unlocked {
			t.Fatalf("request of %v was decided without the lock", r.Charges)
		}
	}
	// Those went through the lock, and the take of "large" alone wrote it,
	// which dropped the snapshot: deny req twice again to take it anew.
	for range 2 {
		if d := take(req); d.Allowed {
			t.Fatalf("take from an empty bucket: %+v, want denied", d)
		}
	}
	if unlocked, _ := takeWhileLocked(t, s, req, unlockedWithin); !unlocked {
		t.Fatal("the request denied twice again waited for the lock")
	}
	// A take of "large" alone writes it: req takes the lock again.
	if d := take(pair("large")); !d.Allowed {
		t.Fatalf("take of large alone: %+v, want allowed", d)
	}
	if unlocked, d := takeWhileLocked(t, s, req, lockedFor); unlocked || d.Allowed {
		t.Fatalf("request after a write to its first bucket: without the lock %v, %+v; want denied under the lock", unlocked, d)
	}
	// Snapshot again (that call was the first denial in a row), then an
	// adjustment that puts "small", the second bucket, further in debt:
	// req takes the lock again, and sees the debt.
	if d := take(req); d.Allowed {
		t.Fatalf("take from an empty bucket: %+v, want denied", d)
	}
	if unlocked, _ := takeWhileLocked(t, s, req, unlockedWithin); !unlocked {
		t.Fatal("the request denied twice again waited for the lock")
	}
	debt := bucket.Request{Subject: alice, Mode: bucket.ModeAdjust, Charges: []bucket.Charge{{Bucket: "small", Limit: small, Cost: 0.5}}}
	if d := take(debt); !d.Allowed {
		t.Fatalf("adjustment: %+v", d)
	}
	if unlocked, d := takeWhileLocked(t, s, req, lockedFor); unlocked || d.Allowed || d.Buckets[1].Remaining != -0.5 {
		t.Fatalf("request after a write to its second bucket: without the lock %v, %+v; want denied under the lock, with -0.5 left in small", unlocked, d)
	}
}

// TestSnapshotOfSeveralBucketsExactUnderConcurrency is
// TestSnapshotExactUnderConcurrency for a request of two buckets, refunds
// going to the one that limits it.
func TestSnapshotOfSeveralBucketsExactUnderConcurrency(t *testing.T) {
	t.Parallel()
	clock := &fakeClock{now: time.Unix(1000, 0)}
	s := New(WithClock(clock.Now), WithSweepInterval(0))
	ctx := context.Background()
	limiting := bucket.Charge{Bucket: "limiting", Limit: bucket.Limit{Capacity: 1000, RefillPerSecond: 1}, Cost: 1}
	wide := bucket.Charge{Bucket: "wide", Limit: bucket.Limit{Capacity: 1e9, RefillPerSecond: 1}, Cost: 1}
	const (
		callers = 8
		refunds = 200
	)
	var allowed atomic.Int64
	var refunding atomic.Bool
	refunding.Store(true)
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			for denials := 0; denials < 1000; {
				over := !refunding.Load()
				d, err := s.Take(ctx, bucket.Request{Subject: "user:hot", Charges: []bucket.Charge{wide, limiting}})
				if err != nil {
					t.Error(err)
					return
				}
				if d.Allowed {
					allowed.Add(1)
				} else if over {
					denials++
				}
			}
		})
	}
	for allowed.Load() < int64(limiting.Limit.Capacity) {
		time.Sleep(time.Millisecond)
	}
	refund := limiting
	refund.Cost = -1
	for range refunds {
		if _, err := s.Take(ctx, bucket.Request{Subject: "user:hot", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{refund}}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Microsecond)
	}
	refunding.Store(false)
	wg.Wait()
	if got, want := allowed.Load(), int64(limiting.Limit.Capacity)+refunds; got != want {
		t.Fatalf("%d requests allowed, want %d: the capacity and every refund, once", got, want)
	}
}
