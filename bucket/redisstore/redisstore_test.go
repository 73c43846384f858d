package redisstore_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// relaxed is the store timeout of tests that are not about timeouts: long
// enough that a loaded test machine never times a batch out.
const relaxed = 10 * time.Second

// newStore is redisstore.New with the relaxed timeout; opts may set another.
func newStore(client redis.UniversalClient, opts ...redisstore.Option) *redisstore.Store {
	return redisstore.New(client, append([]redisstore.Option{redisstore.WithTimeout(relaxed)}, opts...)...)
}

func charge(name string, capacity, rate, cost float64) bucket.Charge {
	return bucket.Charge{Bucket: name, Limit: bucket.Limit{Capacity: capacity, RefillPerSecond: rate}, Cost: cost}
}

func take(t *testing.T, s bucket.Store, req bucket.Request) bucket.Decision {
	t.Helper()
	d, err := s.Take(t.Context(), req)
	if err != nil {
		t.Fatalf("Take(%.80v): %v", req, err)
	}
	return d
}

// contractStores returns a buckettest.NewStore whose stores share client
// but, through distinct key prefixes, no buckets.
func contractStores(client redis.UniversalClient, name string) buckettest.NewStore {
	var n atomic.Int64
	return func(_ *testing.T, clock *buckettest.Clock) bucket.Store {
		prefix := fmt.Sprintf("%s%d", name, n.Add(1))
		return newStore(client, redisstore.WithKeyPrefix(prefix), redisstore.WithClock(clock.Now))
	}
}

// leaseStores is contractStores for the lease suite.
func leaseStores(client redis.UniversalClient, name string) buckettest.NewLeaseStore {
	stores := contractStores(client, name)
	return func(t *testing.T, clock *buckettest.Clock) bucket.LeaseStore {
		s, ok := stores(t, clock).(*redisstore.Store)
		if !ok {
			t.Fatal("contractStores made something other than a *redisstore.Store")
		}
		return s
	}
}

func TestContract(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	t.Run("Buckets", func(t *testing.T) {
		t.Parallel()
		buckettest.Run(t, contractStores(client, "contract"))
	})
	t.Run("Leases", func(t *testing.T) {
		t.Parallel()
		buckettest.RunLeases(t, leaseStores(client, "lease"))
	})
}

func TestCluster(t *testing.T) {
	t.Parallel()
	cluster := redistest.StartCluster(t)
	client := cluster.NewClient(t)
	// The subtests that count script calls or flush scripts run first,
	// alone: the parallel ones wait until they are done.
	t.Run("HotSubjectCoalesced", func(t *testing.T) {
		// One subject lives in one slot: concurrent takes on it are
		// coalesced into a few script calls on its master, and exact.
		const callers, capacity = 200, 50
		s := newStore(client, redisstore.WithKeyPrefix("hot"), redisstore.WithClock(buckettest.NewClock(time.Unix(1e9, 0)).Now))
		req := bucket.Request{Subject: "user:hot", Charges: []bucket.Charge{charge("b", capacity, 1, 1), charge("c", 2*capacity, 1, 2)}}
		take(t, s, bucket.Request{Subject: "user:hot", Charges: []bucket.Charge{charge("b", 1, 1, 0)}}) // loads the script
		resetStats(t, client)
		var allowed atomic.Int64
		var wg sync.WaitGroup
		start := make(chan struct{})
		for range callers {
			wg.Go(func() {
				<-start
				if take(t, s, req).Allowed {
					allowed.Add(1)
				}
			})
		}
		close(start)
		wg.Wait()
		calls := scriptCalls(t, client)
		t.Logf("%d decisions in %d script calls (%.3f per decision)", callers, calls, float64(calls)/callers)
		if got := allowed.Load(); got != capacity {
			t.Errorf("allowed %d takes, want exactly %d", got, capacity)
		}
		if calls > callers/2 {
			t.Errorf("%d script calls for %d concurrent takes, want at most %d", calls, callers, callers/2)
		}
	})
	t.Run("ScriptFlush", func(t *testing.T) {
		// Every master forgets the script: each group's EVALSHA in the
		// pipeline answers NOSCRIPT, and the store resends those groups
		// with EVAL.
		s := newStore(client, redisstore.WithKeyPrefix("flush"))
		reqs := make([]bucket.Request, 30)
		for i := range reqs {
			reqs[i] = bucket.Request{Subject: fmt.Sprint("user:", i), Charges: []bucket.Charge{charge("b", 5, 1e-6, 1)}}
			take(t, s, reqs[i])
		}
		err := client.ForEachMaster(t.Context(), func(ctx context.Context, m *redis.Client) error { return m.ScriptFlush(ctx).Err() })
		if err != nil {
			t.Fatal(err)
		}
		resetStats(t, client)
		var wg sync.WaitGroup
		for _, req := range reqs {
			wg.Go(func() {
				if d := take(t, s, req); !d.Allowed || math.Abs(d.Buckets[0].Remaining-3) > 1e-3 {
					t.Errorf("second take after SCRIPT FLUSH: %+v, want allowed with 3 left", d)
				}
			})
		}
		wg.Wait()
		if n := countCalls(t, client, evalStats); n < 3 {
			t.Errorf("%d EVAL calls after flushing 3 masters, want at least 3", n)
		}
		if d := take(t, s, reqs[0]); !d.Allowed || math.Abs(d.Buckets[0].Remaining-2) > 1e-3 {
			t.Errorf("third take: %+v, want allowed with 2 left", d)
		}
	})
	t.Run("ManySubjects", func(t *testing.T) {
		t.Parallel()
		// Batches span slots and masters: each subject's takes are
		// still exact.
		const subjects, perSubject, capacity = 30, 10, 5
		s := newStore(client, redisstore.WithKeyPrefix("many"), redisstore.WithClock(buckettest.NewClock(time.Unix(1e9, 0)).Now))
		allowed := make([]atomic.Int64, subjects)
		var wg sync.WaitGroup
		for i := range subjects * perSubject {
			wg.Go(func() {
				req := bucket.Request{Subject: fmt.Sprint("user:", i%subjects), ID: fmt.Sprint("call-", i), Charges: []bucket.Charge{charge("b", capacity, 1, 1)}}
				if take(t, s, req).Allowed {
					allowed[i%subjects].Add(1)
				}
			})
		}
		wg.Wait()
		for i := range allowed {
			if got := allowed[i].Load(); got != capacity {
				t.Errorf("subject %d: allowed %d takes, want exactly %d", i, got, capacity)
			}
		}
	})
	t.Run("Contract", func(t *testing.T) {
		t.Parallel()
		buckettest.Run(t, contractStores(client, "cluster"))
	})
	t.Run("Leases", func(t *testing.T) {
		t.Parallel()
		buckettest.RunLeases(t, leaseStores(client, "cluster-lease"))
	})
	t.Run("ServerClockAllOrNothing", func(t *testing.T) {
		t.Parallel()
		s := newStore(client, redisstore.WithKeyPrefix("aon"))
		// MaxCharges buckets in one script: only possible because they
		// share the subject's group's hash slot. Rates are tiny, so that the
		// server clock's refill during the test is negligible.
		charges := make([]bucket.Charge, bucket.MaxCharges)
		for i := range charges {
			charges[i] = charge(fmt.Sprint("b", i), 10, 1e-6, 1)
		}
		charges[5] = charge("small", 1, 1e-6, 1)
		req := bucket.Request{Subject: "user:carol", Charges: charges}
		if d := take(t, s, req); !d.Allowed {
			t.Fatalf("first take denied: %+v", d)
		}
		d := take(t, s, req)
		if d.Allowed {
			t.Fatalf("second take allowed with %q empty", "small")
		}
		if den, ok := d.Denying(); !ok || den.Bucket != "small" {
			t.Fatalf("Denying() = %+v, %v; want small", den, ok)
		}
		// The denial charged nothing: every other bucket still holds 9.
		for i, b := range d.Buckets {
			if want := 9.0; i != 5 && math.Abs(b.Remaining-want) > 1e-3 {
				t.Errorf("bucket %s holds %v after the denial, want %v", b.Bucket, b.Remaining, want)
			}
		}
	})
	t.Run("KeySlots", func(t *testing.T) {
		t.Parallel()
		keys := []string{"cl:{user:alice}:b", redisstore.GroupKey("cl", "user:alice"), redisstore.MarkerKey("cl", "{a}", "x"), "x", "{}", "a{}b", "{a}{b}", "a{b", "日本語", "cl:{" + hashed("{a}") + "}~id:" + hashed("x")}
		for i := range 50 {
			keys = append(keys, fmt.Sprintf("p%d:{user:%d}~lease:gen", i, i*7919))
		}
		for _, k := range keys {
			want, err := client.ClusterKeySlot(t.Context(), k).Result()
			if err != nil {
				t.Fatal(err)
			}
			if got := redisstore.KeySlot(k); int64(got) != want {
				t.Errorf("KeySlot(%q) = %d, CLUSTER KEYSLOT says %d", k, got, want)
			}
		}
	})
	t.Run("SubjectsSpreadOverMasters", func(t *testing.T) {
		t.Parallel()
		// The hash tag is the subject's group, not the prefix: subjects
		// land on every master instead of all on one.
		s := newStore(client, redisstore.WithKeyPrefix("spread"))
		for i := range 60 {
			take(t, s, bucket.Request{Subject: fmt.Sprint("user:", i), Charges: []bucket.Charge{charge("b", 10, 1, 1)}})
		}
		var mu sync.Mutex
		var sizes []int64
		err := client.ForEachMaster(t.Context(), func(ctx context.Context, m *redis.Client) error {
			keys, err := m.Keys(ctx, "spread:*").Result()
			mu.Lock()
			defer mu.Unlock()
			sizes = append(sizes, int64(len(keys)))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(sizes) != 3 || slices.Contains(sizes, 0) {
			t.Fatalf("keys per master = %v, want 3 masters holding some each", sizes)
		}
	})
}

// TestServerClock runs the production path: no clock override, so the
// script reads the server's TIME and sets TTLs.
func TestServerClock(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	s := newStore(client, redisstore.WithKeyPrefix("sc"))
	key := redisstore.GroupKey("sc", "user:alice")
	req := func(mode bucket.Mode, cost float64) bucket.Request {
		return bucket.Request{Subject: "user:alice", Mode: mode, Charges: []bucket.Charge{charge("b", 10, 2, cost)}}
	}
	exists := func() bool {
		t.Helper()
		n, err := client.Exists(t.Context(), key).Result()
		if err != nil {
			t.Fatal(err)
		}
		return n == 1
	}
	checkTTL := func(d bucket.Decision) {
		t.Helper()
		ttl, err := client.PTTL(t.Context(), key).Result()
		if err != nil {
			t.Fatal(err)
		}
		// The TTL is the time until full, rounded up to the millisecond,
		// minus the few milliseconds since the script set it.
		want := d.Buckets[0].ResetAfter
		if ttl > want.Round(time.Millisecond)+time.Millisecond || ttl < want-20*time.Millisecond {
			t.Fatalf("PTTL %s = %v, want about ResetAfter %v", key, ttl, want)
		}
	}

	if d := take(t, s, req(bucket.ModeTake, 0)); d.Buckets[0].Remaining != 10 || exists() {
		t.Fatalf("reading a fresh bucket: remaining %v, key exists %v; want 10 and no key", d.Buckets[0].Remaining, exists())
	}
	first := take(t, s, req(bucket.ModeTake, 3))
	if !first.Allowed || first.Buckets[0].Remaining != 7 {
		t.Fatalf("first take: %+v, want allowed with 7 left", first)
	}
	checkTTL(first)
	second := take(t, s, req(bucket.ModeTake, 3))
	if got := second.Buckets[0].Remaining; !second.Allowed || got >= first.Buckets[0].Remaining || got < 4 {
		t.Fatalf("second take: %+v, want allowed with 4 (plus a little refill) left", second)
	}
	checkTTL(second)
	// A refund that fills the bucket deletes its key at once.
	refund := take(t, s, req(bucket.ModeAdjust, -100))
	if refund.Buckets[0].Remaining != 10 || exists() {
		t.Fatalf("after a full refund: remaining %v, key exists %v; want 10 and no key", refund.Buckets[0].Remaining, exists())
	}
}

// TestIdempotencyServerClock runs idempotent requests on the production
// path: the marker key holds its expiry on the server's clock and expires
// with it.
func TestIdempotencyServerClock(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	s := newStore(client, redisstore.WithKeyPrefix("idem"))
	marker := redisstore.MarkerKey("idem", "user:alice", "settle-1")
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1e-6}
	req := func(mode bucket.Mode, id string, cost float64) bucket.Request {
		return bucket.Request{Subject: "user:alice", Mode: mode, ID: id, Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: cost}}}
	}
	before := time.Now()
	if d := take(t, s, req(bucket.ModeAdjust, "settle-1", 4)); !d.Allowed || d.Duplicate {
		t.Fatalf("first settle: %+v, want applied", d)
	}
	after := time.Now()
	// The marker holds its expiry instant and has the window as its TTL.
	stored, err := client.Get(t.Context(), marker).Int64()
	if err != nil {
		t.Fatalf("GET %s: %v", marker, err)
	}
	expires := time.UnixMicro(stored)
	if lo, hi := before.Add(bucket.DefaultIDWindow-time.Second), after.Add(bucket.DefaultIDWindow+time.Second); expires.Before(lo) || expires.After(hi) {
		t.Fatalf("marker expires at %v, want about %v from now", expires, bucket.DefaultIDWindow)
	}
	if ttl, err := client.PTTL(t.Context(), marker).Result(); err != nil || ttl > bucket.DefaultIDWindow || ttl < bucket.DefaultIDWindow-time.Second {
		t.Fatalf("PTTL %s = %v, %v; want about %v", marker, ttl, err, bucket.DefaultIDWindow)
	}
	// The window is the request's own.
	short := req(bucket.ModeAdjust, "short", 0)
	short.IDWindow = 30 * time.Second
	take(t, s, short)
	if ttl, err := client.PTTL(t.Context(), redisstore.MarkerKey("idem", "user:alice", "short")).Result(); err != nil || ttl > short.IDWindow || ttl < short.IDWindow-time.Second {
		t.Fatalf("PTTL of a marker with a %v window = %v, %v", short.IDWindow, ttl, err)
	}
	d := take(t, s, req(bucket.ModeAdjust, "settle-1", 4))
	if !d.Allowed || !d.Duplicate || math.Abs(d.Buckets[0].Remaining-6) > 1e-3 {
		t.Fatalf("resent settle: %+v, want a duplicate with 6 left", d)
	}
	// A denied take writes no marker.
	if d := take(t, s, req(bucket.ModeTake, "big", 7)); d.Allowed {
		t.Fatalf("take of 7 from 6: %+v, want denied", d)
	}
	if n, err := client.Exists(t.Context(), redisstore.MarkerKey("idem", "user:alice", "big")).Result(); err != nil || n != 0 {
		t.Fatalf("EXISTS marker of a denied take = %d, %v; want 0", n, err)
	}
	// Once the marker has expired, the ID is applied anew.
	if err := client.PExpire(t.Context(), marker, time.Millisecond).Err(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := client.Exists(t.Context(), marker).Result()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("marker with a 1 ms TTL still exists after 5 s")
		}
		time.Sleep(time.Millisecond)
	}
	if d := take(t, s, req(bucket.ModeAdjust, "settle-1", 4)); !d.Allowed || d.Duplicate || math.Abs(d.Buckets[0].Remaining-2) > 1e-3 {
		t.Fatalf("settle after the marker expired: %+v, want applied with 2 left", d)
	}
}

// TestResentAfterLostReply is what IDs are for: a settle whose reply was
// lost (the server hung past the deadline, then ran it) is resent with the
// same ID and charged once.
func TestResentAfterLostReply(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	client := srv.NewClient(t, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries = true, -1 })
	s := redisstore.New(client, redisstore.WithTimeout(time.Second))
	settle := bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, ID: "call-7/settle", Charges: []bucket.Charge{charge("b", 5, 1e-6, 2)}}
	take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 0)}}) // load the script
	if err := srv.Pause(0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Take(t.Context(), settle); !errors.Is(err, bucket.ErrOutcomeUnknown) {
		t.Fatalf("Take on a hung server: %v, want an unknown outcome", err)
	}
	if err := srv.Resume(); err != nil {
		t.Fatal(err)
	}
	// The resend either finds the first attempt applied (a duplicate) or
	// applies it itself; either way the bucket is charged once.
	d := take(t, s, settle)
	if !d.Allowed {
		t.Fatalf("resent settle: %+v", d)
	}
	if d := take(t, s, settle); !d.Duplicate {
		t.Fatalf("second resend: %+v, want a duplicate", d)
	}
	if got := take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 0)}}).Buckets[0].Remaining; math.Abs(got-3) > 1e-3 {
		t.Fatalf("remaining %v after a settle of 2 sent three times, want 3", got)
	}
}

// TestLeasesAcrossStores is two application servers, each with its own
// Store and connection pool, sharing one concurrency limit on the server's
// clock. When one of them dies holding leases, its slots come back once
// the lease TTL has passed, and the lease set then disappears.
func TestLeasesAcrossStores(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	dying, inspect := srv.NewClient(t), srv.NewClient(t)
	a := newStore(dying, redisstore.WithKeyPrefix("shared"))
	b := newStore(srv.NewClient(t), redisstore.WithKeyPrefix("shared"))
	const key = "shared:{user:alice}~lease:generate_streams"
	const ttl = 300 * time.Millisecond
	lease := func(id string, d time.Duration) bucket.LeaseRequest {
		return bucket.LeaseRequest{Subject: "user:alice", Name: "generate_streams", Limit: 2, ID: id, TTL: d}
	}
	// b's own lease lives long and is renewed; a's expire after ttl.
	began := time.Now()
	for _, st := range []struct {
		store        *redisstore.Store
		req          bucket.LeaseRequest
		wantAcquired bool
		wantInUse    int
	}{
		{a, lease("a1", ttl), true, 1},
		{b, lease("b1", time.Minute), true, 2},
		{b, lease("b2", time.Minute), false, 2},
		{a, lease("a2", ttl), false, 2},
		// b1 renewing from a's Store is still one lease.
		{a, lease("b1", time.Minute), true, 2},
	} {
		if d := acquire(t, st.store, st.req); d.Acquired != st.wantAcquired || d.InUse != st.wantInUse {
			t.Fatalf("Acquire(%s) = %+v, want Acquired %v with %d in use", st.req.ID, d, st.wantAcquired, st.wantInUse)
		}
	}
	if pttl, err := inspect.PTTL(t.Context(), key).Result(); err != nil || pttl <= ttl || pttl > time.Minute {
		t.Fatalf("PTTL %s = %v, %v; want the last lease's expiry, about 1m", key, pttl, err)
	}
	// a dies holding a1. b polls, within a bound, until a1's slot is back.
	if err := dying.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		d := acquire(t, b, lease("b2", time.Minute))
		if d.Acquired {
			if waited := time.Since(began); waited < ttl-50*time.Millisecond {
				t.Fatalf("a's lease freed after %v, before its TTL %v", waited, ttl)
			}
			if d.InUse != 2 {
				t.Fatalf("after a's lease expired: %+v, want 2 in use (b1 and b2)", d)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a's lease still held 5 s after it was acquired with TTL %v: %+v", ttl, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Releasing every lease deletes the set: an idle subject costs nothing.
	for _, id := range []string{"b1", "b2"} {
		if err := b.Release(t.Context(), "user:alice", "generate_streams", id); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := inspect.Exists(t.Context(), key).Result(); err != nil || n != 0 {
		t.Fatalf("EXISTS %s after every release = %d, %v; want 0", key, n, err)
	}
	// A set whose holders all died expires with its last lease.
	acquire(t, b, lease("b3", 50*time.Millisecond))
	deadline = time.Now().Add(5 * time.Second)
	for {
		n, err := inspect.Exists(t.Context(), key).Result()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists 5 s after its last lease expired", key)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func acquire(t *testing.T, s bucket.LeaseStore, req bucket.LeaseRequest) bucket.LeaseDecision {
	t.Helper()
	d, err := s.Acquire(t.Context(), req)
	if err != nil {
		t.Fatalf("Acquire(%+v): %v", req, err)
	}
	return d
}

// TestIDAndLeaseKeys shows the keys of ID markers and lease sets: an ID
// marker beside the subject's group hash, in its hash slot; a lease set in
// the subject's; never equal to one another.
func TestIDAndLeaseKeys(t *testing.T) {
	t.Parallel()
	c := redistest.Start(t).NewClient(t)
	s := newStore(c, redisstore.WithKeyPrefix("k"))
	// A bucket named like an ID marker's or a lease set's tail.
	take(t, s, bucket.Request{Subject: "user:alice", ID: "req-1", Charges: []bucket.Charge{charge("b", 2, 1, 1), charge("~id:req-1", 2, 1, 1)}})
	take(t, s, bucket.Request{Subject: "user:alice", ID: "{odd}", Charges: []bucket.Charge{charge("b", 2, 1, 0)}})
	acquire(t, s, bucket.LeaseRequest{Subject: "user:alice", Name: "gen", Limit: 1, ID: "call-1", TTL: time.Minute})
	acquire(t, s, bucket.LeaseRequest{Subject: "user:alice", Name: "a}{b", Limit: 1, ID: "{call-2}", TTL: time.Minute})
	keys, err := c.Keys(t.Context(), "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(keys)
	group := redisstore.GroupKey("k", "user:alice")
	want := []string{
		group,
		group + "~id:user:alice/" + hashed("{odd}"),
		group + "~id:user:alice/req-1",
		"k:{user:alice}~lease:" + hashed("a}{b"),
		"k:{user:alice}~lease:gen",
	}
	slices.Sort(want)
	if !slices.Equal(keys, want) {
		t.Fatalf("keys = %q, want %q", keys, want)
	}
	if got := redisstore.MarkerKey("k", "user:alice", "req-1"); got != group+"~id:user:alice/req-1" {
		t.Errorf("MarkerKey = %q", got)
	}
	for _, k := range keys {
		wantTag := hashTag(group)
		if strings.Contains(k, "~lease:") {
			wantTag = "user:alice"
		}
		if tag := hashTag(k); tag != wantTag {
			t.Errorf("hash tag of %q = %q, want %q", k, tag, wantTag)
		}
	}
	fields, err := redisstore.BucketFields(t.Context(), c, group)
	slices.Sort(fields)
	if want := []string{"user:alice/" + hashed("~id:req-1"), "user:alice/b"}; err != nil || !slices.Equal(fields, want) {
		t.Errorf("HKEYS %s = %q, %v; want %q", group, fields, err, want)
	}
	for key, wantMembers := range map[string][]string{
		"k:{user:alice}~lease:gen":               {"call-1"},
		"k:{user:alice}~lease:" + hashed("a}{b"): {hashed("{call-2}")},
	} {
		if members, err := c.ZRange(t.Context(), key, 0, -1).Result(); err != nil || !slices.Equal(members, wantMembers) {
			t.Errorf("ZRANGE %s = %q, %v; want %q", key, members, err, wantMembers)
		}
	}
}

func TestScriptFlush(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	s := newStore(client)
	req := bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 1)}}
	take(t, s, req)
	if err := client.ScriptFlush(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	if err := client.ConfigResetStat(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	// EVALSHA now answers NOSCRIPT; the store falls back to EVAL, which
	// also caches the script again.
	for range 2 {
		take(t, s, req)
	}
	d := take(t, s, req)
	if got := d.Buckets[0].Remaining; math.Abs(got-1) > 1e-3 {
		t.Fatalf("after a flush and three takes: remaining %v, want 1", got)
	}
	stats, err := client.Info(t.Context(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stats, "cmdstat_eval:calls=1,") || !strings.Contains(stats, "cmdstat_evalsha:calls=3,") {
		t.Fatalf("want one EVAL (the NOSCRIPT fallback) and three EVALSHA; commandstats:\n%s", stats)
	}
}

// hashed is the documented escape of a name that cannot be used as is.
func hashed(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "#" + base64.RawURLEncoding.EncodeToString(sum[:18])
}

func TestKeys(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	long := strings.Repeat("x", 64)
	huge := "user:" + strings.Repeat("y", 1<<20)
	rows := []struct {
		name    string
		prefix  string
		subject string
		bucket  string
		// The escaped prefix, subject and bucket name.
		wantPrefix, wantSubject, wantBucket string
	}{
		{name: "readable subject", prefix: "k", subject: "user:alice", bucket: "search", wantPrefix: "k", wantSubject: "user:alice", wantBucket: "search"},
		{name: "every safe character", prefix: "k", subject: "azAZ09._@=-:", bucket: "b.1_@=-:", wantPrefix: "k", wantSubject: "azAZ09._@=-:", wantBucket: "b.1_@=-:"},
		// The field, 66 bytes joined, is hashed.
		{name: "64-byte subject", prefix: "k", subject: long, bucket: "b", wantPrefix: "k", wantSubject: long, wantBucket: "b"},
		{name: "65-byte subject", prefix: "k", subject: long + "x", bucket: "b", wantPrefix: "k", wantSubject: hashed(long + "x"), wantBucket: "b"},
		{name: "1 MiB subject", prefix: "k", subject: huge, bucket: "b", wantPrefix: "k", wantSubject: hashed(huge), wantBucket: "b"},
		{name: "braces", prefix: "k", subject: "{a}", bucket: "b", wantPrefix: "k", wantSubject: hashed("{a}"), wantBucket: "b"},
		{name: "key-shaped subject", prefix: "k", subject: "k:{a}:b", bucket: "b", wantPrefix: "k", wantSubject: hashed("k:{a}:b"), wantBucket: "b"},
		{name: "group-shaped subject", prefix: "k", subject: "g/1", bucket: "b", wantPrefix: "k", wantSubject: hashed("g/1"), wantBucket: "b"},
		{name: "control bytes", prefix: "k", subject: "a\x00\r\nb", bucket: "b", wantPrefix: "k", wantSubject: hashed("a\x00\r\nb"), wantBucket: "b"},
		{name: "invalid UTF-8", prefix: "k", subject: "\xff\xfe", bucket: "b", wantPrefix: "k", wantSubject: hashed("\xff\xfe"), wantBucket: "b"},
		{name: "subject posing as a hash", prefix: "k", subject: hashed("x"), bucket: "b", wantPrefix: "k", wantSubject: hashed(hashed("x")), wantBucket: "b"},
		{name: "odd bucket name", prefix: "k", subject: "alice", bucket: "}{*", wantPrefix: "k", wantSubject: "alice", wantBucket: hashed("}{*")},
		{name: "bucket name with spaces", prefix: "k", subject: "alice", bucket: "a b c", wantPrefix: "k", wantSubject: "alice", wantBucket: hashed("a b c")},
		{name: "long bucket name", prefix: "k", subject: "alice", bucket: long + "x", wantPrefix: "k", wantSubject: "alice", wantBucket: hashed(long + "x")},
		{name: "odd prefix", prefix: "app{1}", subject: "alice", bucket: "b", wantPrefix: hashed("app{1}"), wantSubject: "alice", wantBucket: "b"},
		{name: "default prefix", subject: "alice", bucket: "b", wantPrefix: "cl", wantSubject: "alice", wantBucket: "b"},
	}
	for i, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// Each row has a database of its own, so KEYS * sees only its key.
			client := srv.NewClient(t, func(o *redis.Options) { o.DB = i })
			var opts []redisstore.Option
			if tc.prefix != "" {
				opts = append(opts, redisstore.WithKeyPrefix(tc.prefix))
			}
			s := newStore(client, opts...)
			take(t, s, bucket.Request{Subject: tc.subject, Charges: []bucket.Charge{charge(tc.bucket, 2, 1, 1)}})
			keys, err := client.Keys(t.Context(), "*").Result()
			if err != nil {
				t.Fatal(err)
			}
			// The documented format: the group is the FNV-1a hash of the
			// escaped subject, mixed by MurmurHash3's fmix64, modulo the
			// number of groups, and the field joins the escaped subject
			// and bucket name with "/", or hashes the join if it is over
			// 64 bytes.
			h := fnv.New64a()
			h.Write([]byte(tc.wantSubject))
			g := h.Sum64()
			g ^= g >> 33
			g *= 0xff51afd7ed558ccd
			g ^= g >> 33
			g *= 0xc4ceb9fe1a85ec53
			g ^= g >> 33
			tag := fmt.Sprintf("g/%d", g%redisstore.DefaultGroups)
			wantKey := tc.wantPrefix + ":{" + tag + "}"
			wantField := tc.wantSubject + "/" + tc.wantBucket
			if len(wantField) > 64 {
				wantField = hashed(wantField)
			}
			if len(keys) != 1 || keys[0] != wantKey {
				t.Fatalf("keys = %.200q, want [%q]", keys, wantKey)
			}
			if len(keys[0]) > 100 {
				t.Errorf("key is %d bytes long", len(keys[0]))
			}
			fields, err := redisstore.BucketFields(t.Context(), client, keys[0])
			if want := []string{wantField}; err != nil || !slices.Equal(fields, want) {
				t.Fatalf("HKEYS %s = %q, %v; want %q", keys[0], fields, err, want)
			}
			// Redis Cluster hashes the part between the first "{" and the
			// next "}": it must be exactly the group's tag.
			if got := hashTag(keys[0]); got != tag {
				t.Errorf("hash tag of %q = %q, want %q", keys[0], got, tag)
			}
		})
	}
	if len(rows) > 16 {
		t.Fatalf("%d rows but Redis has 16 databases", len(rows))
	}
}

// hashTag returns the part of key that Redis Cluster hashes.
func hashTag(key string) string {
	_, rest, ok := strings.Cut(key, "{")
	if !ok {
		return key
	}
	tag, _, ok := strings.Cut(rest, "}")
	if !ok || tag == "" {
		return key
	}
	return tag
}

func TestKeysAreDistinct(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	s := newStore(client)
	// Pairs that a naive join would confuse, and names that look like
	// other names' escapes.
	pairs := [][2]string{
		{"a:b", "c"}, {"a", "b:c"}, {"a", "b"}, {"a:", "b"}, {"a", ":b"},
		{"x", "b"}, {hashed("x"), "b"}, {"{x}", "b"}, {"x}", "b"}, {"x", "}b"},
		{strings.Repeat("z", 65), "b"}, {strings.Repeat("z", 66), "b"},
	}
	for _, p := range pairs {
		if d := take(t, s, bucket.Request{Subject: p[0], Charges: []bucket.Charge{charge(p[1], 1, 1e-6, 1)}}); !d.Allowed {
			t.Fatalf("subject %q bucket %q shares a key with an earlier pair", p[0], p[1])
		}
	}
	// One field per bucket, in its subject's group hash: 12 buckets in all.
	keys, err := client.Keys(t.Context(), "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	var fields int64
	for _, k := range keys {
		f, err := redisstore.BucketFields(t.Context(), client, k)
		if err != nil {
			t.Fatal(err)
		}
		fields += int64(len(f))
	}
	if fields != int64(len(pairs)) {
		t.Fatalf("%d bucket fields in %d keys, want %d", fields, len(keys), len(pairs))
	}
}

func TestCorruptValues(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	s := newStore(client, redisstore.WithKeyPrefix("bad"))
	ctx := t.Context()
	for _, tc := range []struct {
		name    string
		subject string
		write   func(key, field string) error
		bucket  string
		wantErr string
	}{
		{"garbage", "alice", func(k, f string) error { return client.HSet(ctx, k, f, "garbage").Err() }, "garbage", "malformed bucket value"},
		{"NaN", "alice", func(k, f string) error { return client.HSet(ctx, k, f, "nan").Err() }, "nan", "malformed bucket value"},
		{"minus infinity", "alice", func(k, f string) error { return client.HSet(ctx, k, f, "-inf").Err() }, "inf", "malformed bucket value"},
		{"old format", "alice", func(k, f string) error { return client.HSet(ctx, k, f, "2.5 1763900000000000").Err() }, "old", "malformed bucket value"},
		{"wrong type", "carol", func(k, _ string) error { return client.Set(ctx, k, "x", 0).Err() }, "b", "WRONGTYPE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			key := redisstore.GroupKey("bad", tc.subject)
			if err := tc.write(key, redisstore.Field(tc.subject, tc.bucket)); err != nil {
				t.Fatal(err)
			}
			if tc.wantErr != "WRONGTYPE" {
				tc.wantErr += " at key " + key + ", field " + redisstore.Field(tc.subject, tc.bucket)
			}
			good := "good-" + tc.bucket
			_, err := s.Take(t.Context(), bucket.Request{Subject: tc.subject, Charges: []bucket.Charge{charge(good, 5, 1, 1), charge(tc.bucket, 5, 1, 1)}})
			var rerr redis.Error
			if !errors.As(err, &rerr) || !errors.Is(err, bucket.ErrNotApplied) || !strings.Contains(err.Error(), tc.wantErr) || !strings.HasPrefix(err.Error(), "redisstore: take: ") {
				t.Fatalf("Take over a corrupt key: %v, want a Redis error wrapping bucket.ErrNotApplied and mentioning %q", err, tc.wantErr)
			}
			// The script failed before writing: the good bucket is untouched.
			if tc.subject == "alice" {
				if ok, err := client.HExists(t.Context(), key, redisstore.Field(tc.subject, good)).Result(); err != nil || ok {
					t.Fatalf("HEXISTS %s %s = %v, %v; want false", key, good, ok, err)
				}
			}
		})
	}
}

// TestLostReplyMayHaveCharged shows why an error after a timeout means
// "unknown": the hung server runs the script once it wakes up.
func TestLostReplyMayHaveCharged(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	client := srv.NewClient(t, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries = true, -1 })
	s := redisstore.New(client, redisstore.WithTimeout(time.Second))
	req := bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 1)}}
	take(t, s, req)
	if err := srv.Pause(0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Take(t.Context(), req); !errors.Is(err, bucket.ErrOutcomeUnknown) {
		t.Fatalf("Take on a hung server: %v, want an unknown outcome", err)
	}
	if err := srv.Resume(); err != nil {
		t.Fatal(err)
	}
	read := bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 0)}}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := take(t, s, read).Buckets[0].Remaining
		if math.Abs(got-3) < 1e-3 {
			return // both charges applied
		}
		if time.Now().After(deadline) {
			t.Fatalf("remaining %v, want 3: the timed-out charge was never applied", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// flood runs workers goroutines per store, each taking one token at a time
// from one shared bucket until d has passed, and returns how many takes
// were allowed, how long the run took from the first call to the last
// reply, and how long callers kept calling after the first decision came
// back (refill before it was wasted on a full bucket, however long a busy
// machine took to run the first calls). Every worker makes one call on
// another bucket first, so that the run starts with the connection pools
// filled, as in a long-running server.
func flood(t *testing.T, stores []*redisstore.Store, workers int, lim bucket.Limit, d time.Duration) (allowed int64, elapsed, calling time.Duration) {
	t.Helper()
	var n, calls, first atomic.Int64
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, len(stores)*workers)
	req := bucket.Request{Subject: "user:flood", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 1}}}
	warmup := bucket.Request{Subject: "user:warmup", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 0}}}
	var stop time.Time
	for _, s := range stores {
		for range workers {
			ready.Add(1)
			done.Go(func() {
				_, err := s.Take(t.Context(), warmup)
				ready.Done()
				if err != nil {
					errs <- err
					return
				}
				<-start
				for time.Now().Before(stop) {
					dec, err := s.Take(t.Context(), req)
					if err != nil {
						errs <- err
						return
					}
					calls.Add(1)
					first.CompareAndSwap(0, time.Now().UnixNano())
					if dec.Allowed {
						n.Add(1)
					}
				}
			})
		}
	}
	ready.Wait()
	began := time.Now()
	stop = began.Add(d)
	close(start)
	done.Wait()
	elapsed = time.Since(began)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	calling = max(0, stop.Sub(time.Unix(0, first.Load())))
	t.Logf("%d callers made %d calls in %v (%.0f/s), the first decision after %v", len(stores)*workers, calls.Load(), elapsed.Round(time.Millisecond), float64(calls.Load())/elapsed.Seconds(), (d - calling).Round(time.Millisecond))
	return n.Load(), elapsed, calling
}

// admissible is how many unit takes a bucket can allow over d: its capacity
// plus its refill.
func admissible(lim bucket.Limit, d time.Duration) float64 {
	return lim.Capacity + lim.RefillPerSecond*d.Seconds()
}

// floodLimit and floodTime size the exactness runs: demand (hundreds of
// callers) far above the refill, for long enough to refill 6 capacities.
// The capacity holds 1 s of refill, so that a scheduling stall of a busy
// test machine (a cold CI run compiles other packages meanwhile) does not
// waste refill.
var (
	floodLimit = bucket.Limit{Capacity: 400, RefillPerSecond: 400}
	floodTime  = 1500 * time.Millisecond
)

// checkExact asserts that allowed is within what the bucket could admit:
// at most capacity plus refill over the whole run (and one token of
// slack), and at least 95% of capacity plus refill while callers were
// still calling.
func checkExact(t *testing.T, allowed int64, elapsed, calling time.Duration) {
	t.Helper()
	upper, lower := admissible(floodLimit, elapsed)+1, 0.95*admissible(floodLimit, calling)
	t.Logf("allowed %d in %v: bound %.1f (%.1f%% of it), floor %.1f", allowed, elapsed.Round(time.Millisecond), upper-1, 100*float64(allowed)/(upper-1), lower)
	if float64(allowed) > upper {
		t.Errorf("allowed %d, more than capacity + refill %.1f", allowed, upper)
	}
	if float64(allowed) < lower {
		t.Errorf("allowed %d, less than 95%% of capacity + refill (%.1f)", allowed, lower)
	}
}

// TestConcurrentStoresAreExact floods one bucket from several Stores, each
// with its own connection pool, on the server clock: as if several
// application servers shared one Redis. Like every flood, it is not
// parallel: it checks that callers keep up with the refill, which needs the
// CPU that the package's other tests (a cluster starting, bursts of
// hundreds of calls) would take.
func TestConcurrentStoresAreExact(t *testing.T) {
	srv := redistest.Start(t)
	stores := make([]*redisstore.Store, 4)
	for i := range stores {
		stores[i] = newStore(srv.NewClient(t), redisstore.WithKeyPrefix("exact"))
	}
	allowed, elapsed, calling := flood(t, stores, 64, floodLimit, floodTime)
	checkExact(t, allowed, elapsed, calling)
}

// TestSkewedAppClocksOverAdmit is why the script reads the Redis server's
// clock instead of the application's. Two application servers share a
// bucket: one drains it, then the other asks for a whole capacity at once.
// On the server's clock the second is denied, since the bucket holds only
// what it refilled in between, and a flood from both admits exactly
// capacity plus refill. With clocks 10 s ahead and 10 s behind (the
// negative control, possible only through the test-only clock override),
// the fast one sees 20 s of refill that never happened, and is allowed a
// second capacity at once. (A stored empty instant, unlike the level and
// instant that earlier versions stored, does not let skewed clocks gain
// again on every turn: the slow one then finds the bucket in debt. But the
// fast one's gain is there.)
func TestSkewedAppClocksOverAdmit(t *testing.T) {
	// Not parallel: see TestConcurrentStoresAreExact.
	srv := redistest.Start(t)
	skewed := func(d time.Duration) func() time.Time { return func() time.Time { return time.Now().Add(d) } }
	lim := bucket.Limit{Capacity: 400, RefillPerSecond: 40}
	for _, tc := range []struct {
		name      string
		clocks    []func() time.Time
		overAdmit bool
	}{
		{name: "ServerClock", clocks: []func() time.Time{nil, nil}},
		{name: "AppClocksNegativeControl", clocks: []func() time.Time{skewed(-10 * time.Second), skewed(10 * time.Second)}, overAdmit: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stores := make([]*redisstore.Store, len(tc.clocks))
			for i, clock := range tc.clocks {
				opts := []redisstore.Option{redisstore.WithKeyPrefix(tc.name)}
				if clock != nil {
					opts = append(opts, redisstore.WithClock(clock))
				}
				stores[i] = newStore(srv.NewClient(t), opts...)
			}
			drain := bucket.Request{Subject: "user:turns", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: lim.Capacity}}}
			began := time.Now()
			if d := take(t, stores[0], drain); !d.Allowed {
				t.Fatalf("the first drain of a fresh bucket: %+v, want allowed", d)
			}
			d := take(t, stores[1], drain)
			elapsed := time.Since(began)
			bound := admissible(lim, elapsed)
			t.Logf("two drains of %v in %v: the second allowed %v, bound %.1f", lim.Capacity, elapsed.Round(time.Millisecond), d.Allowed, bound)
			switch {
			case tc.overAdmit && !d.Allowed:
				t.Fatalf("skewed app clocks denied the second drain (%+v): the negative control shows nothing", d)
			case !tc.overAdmit && d.Allowed:
				t.Fatalf("the second drain was allowed: %.0f tokens in %v, over the bound %.1f", 2*lim.Capacity, elapsed, bound)
			case !tc.overAdmit:
				allowed, elapsed, calling := flood(t, stores, 64, floodLimit, floodTime)
				checkExact(t, allowed, elapsed, calling)
			}
		})
	}
}
