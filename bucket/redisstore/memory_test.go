package redisstore_test

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strconv"
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

// memoryBuckets are the buckets of one identity in the memory
// measurements: realistic names, so that field names cost what they would
// in production.
var memoryBuckets = []string{"requests", "tokens", "search"}

// fillIdentities charges one token from each of the first n of
// memoryBuckets for identities "user:0" to "user:<count-1>" on the
// server's clock (the production path, with TTLs), with enough concurrent
// callers that the store batches them. The buckets refill slowly enough
// that none is full, or expires, while a test looks at them.
func fillIdentities(tb testing.TB, s *redisstore.Store, count, n int) {
	tb.Helper()
	charges := make([]bucket.Charge, n)
	for i := range charges {
		charges[i] = charge(memoryBuckets[i], 100, 1e-3, 1)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(count) {
					return
				}
				d, err := s.Take(context.Background(), bucket.Request{Subject: "user:" + strconv.FormatInt(i, 10), Charges: charges})
				if err == nil && !d.Allowed {
					err = fmt.Errorf("identity %d denied: %+v", i, d)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		tb.Fatal(err)
	}
}

// usedMemory returns the server's used_memory: the bytes its allocator
// handed out, keys, values, expiry entries and hash tables included.
func usedMemory(tb testing.TB, c *redis.Client) int64 {
	tb.Helper()
	info, err := c.Info(context.Background(), "memory").Result()
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.SplitSeq(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "used_memory:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				tb.Fatal(err)
			}
			return n
		}
	}
	tb.Fatalf("no used_memory in INFO memory:\n%s", info)
	return 0
}

// settledMemory returns used_memory once the server has finished rehashing
// its key tables: a table that grows is rehashed incrementally, and until
// then the old one is counted too (up to 8 bytes a key per table). Redis
// finishes the work in its cron (activerehashing), within a few hundred
// milliseconds of idleness; settledMemory waits until used_memory stops
// falling, for at most 3 seconds.
func settledMemory(tb testing.TB, c *redis.Client) int64 {
	tb.Helper()
	last := usedMemory(tb, c)
	for range 30 {
		time.Sleep(100 * time.Millisecond)
		m := usedMemory(tb, c)
		if m >= last {
			return m
		}
		last = m
	}
	return last
}

// perGroup is how many buckets the memory measurements put in a group on
// average, as WithGroups advises: the number of groups is the number of
// buckets / perGroup.
const perGroup = 64

// groupsFor returns the number of groups WithGroups advises for buckets
// active buckets.
func groupsFor(buckets int) int { return max(1, buckets/perGroup) }

// bytesPerBucket fills count identities with n buckets each into an empty
// database of client's server, spread over groups groups, and returns the
// growth of used_memory per bucket, after checking that the buckets are
// stored.
func bytesPerBucket(tb testing.TB, client *redis.Client, count, n, groups int) float64 {
	tb.Helper()
	ctx := context.Background()
	if err := client.FlushDB(ctx).Err(); err != nil {
		tb.Fatal(err)
	}
	s := newStore(client, redisstore.WithKeyPrefix("cl"), redisstore.WithGroups(groups))
	// Loads the script and fills the connection pool, whose buffers count
	// in used_memory, before the first reading.
	fillIdentities(tb, s, 64, n)
	if err := client.FlushDB(ctx).Err(); err != nil {
		tb.Fatal(err)
	}
	before := usedMemory(tb, client)
	fillIdentities(tb, s, count, n)
	after := settledMemory(tb, client)
	// The buckets are really there: a read of the last identity sees its
	// charge, and the database holds about as many groups as it should
	// (each of count identities misses a given group with probability
	// 1 - 1/groups).
	d, err := s.Take(ctx, bucket.Request{Subject: "user:" + strconv.Itoa(count-1), Charges: []bucket.Charge{charge(memoryBuckets[0], 100, 1e-3, 0)}})
	if err != nil {
		tb.Fatal(err)
	}
	if got := d.Buckets[0].Remaining; got > 99.01 {
		tb.Fatalf("the last identity's bucket holds %v, want 99: nothing was stored", got)
	}
	keys, err := client.DBSize(ctx).Result()
	if err != nil {
		tb.Fatal(err)
	}
	if want := float64(groups) * (1 - math.Pow(1-1/float64(groups), float64(count))); float64(keys) < 0.95*want {
		tb.Fatalf("%d keys for %d identities in %d groups, want about %.0f", keys, count, groups, want)
	}
	return float64(after-before) / float64(count*n)
}

// TestMemoryPerBucket measures what an active bucket costs in Redis memory
// (used_memory: keys, values, TTLs and key tables included) over 20,000
// identities ("user:<n>") with one bucket each and with three (named
// "requests", "tokens" and "search"), in as many groups as WithGroups
// advises (a bucket per 64), so that a change of the storage format that
// costs memory fails it. The targets of issue 9 are 100 bytes per bucket
// with one bucket per identity and 64 with three. 20,000 identities are
// enough for the per-group costs (a key, its TTL, the listpack's
// rounding up to an allocation size) to be shared as at any larger count
// in the same number of groups per bucket: BenchmarkMemoryPerBucket
// measures larger counts, and the default number of groups.
func TestMemoryPerBucket(t *testing.T) {
	t.Parallel()
	const identities = 20_000
	client := redistest.Start(t).NewClient(t)
	for _, tc := range []struct {
		buckets int
		wantMax float64
	}{
		// Measured: 32.2 and 33.8 (20,000 identities), 36.0 to 37.2
		// and 34.3 to 35.6 (100,000 to 1,000,000); a hash per subject
		// cost 162 and 64.8.
		{buckets: 1, wantMax: 100},
		{buckets: 3, wantMax: 64},
	} {
		// Not parallel: the rows share the server, and each measures it.
		got := bytesPerBucket(t, client, identities, tc.buckets, groupsFor(identities*tc.buckets))
		t.Logf("%d bucket(s) per identity: %.1f bytes per bucket", tc.buckets, got)
		// A bucket costs at least its field and value: a measurement
		// below that measured nothing.
		if got < 20 || got > tc.wantMax {
			t.Errorf("%d bucket(s) per identity: %.1f bytes per bucket, want from 20 to %v", tc.buckets, got, tc.wantMax)
		}
	}
}

// storedBuckets returns how many buckets the groups of prefix hold, and
// how many groups there are.
func storedBuckets(tb testing.TB, c *redis.Client, prefix string) (buckets, groups int64) {
	tb.Helper()
	iter := c.Scan(context.Background(), 0, prefix+":{g/*}", 1000).Iterator()
	for iter.Next(context.Background()) {
		fields, err := redisstore.BucketFields(context.Background(), c, iter.Val())
		if err != nil {
			tb.Fatal(err)
		}
		buckets += int64(len(fields))
		groups++
	}
	if err := iter.Err(); err != nil {
		tb.Fatal(err)
	}
	return buckets, groups
}

// sweepStale writes count identities with one bucket each, in groups
// groups, on a test clock; lets every bucket refill to full; then writes
// touches new identities, each of which samples its group for full buckets
// to delete. It returns the stored buckets (the touches' own not counted)
// and the growth of used_memory after the first writes and after the
// touches.
func sweepStale(tb testing.TB, client *redis.Client, count, touches, groups int) (bucketsBefore, bucketsAfter, memBefore, memAfter int64) {
	tb.Helper()
	ctx := context.Background()
	if err := client.FlushDB(ctx).Err(); err != nil {
		tb.Fatal(err)
	}
	clock := buckettest.NewClock(time.Unix(1e9, 0))
	s := newStore(client, redisstore.WithKeyPrefix("stale"), redisstore.WithGroups(groups), redisstore.WithClock(clock.Now))
	// Loads the script and fills the connection pool before the baseline.
	fillIdentities(tb, s, 64, 1)
	if err := client.FlushDB(ctx).Err(); err != nil {
		tb.Fatal(err)
	}
	base := usedMemory(tb, client)
	fillIdentities(tb, s, count, 1)
	memBefore = settledMemory(tb, client) - base
	bucketsBefore, _ = storedBuckets(tb, client, "stale")
	// Every bucket, at 99 of 100 tokens refilling at 1e-3 per second, is
	// full 1,000 s after it was written, and full by its fill class (2^37
	// µs from empty, 99,000 s before it was written) 38,440 s after.
	clock.Advance(1e5*time.Second + time.Second)
	req := bucket.Request{Charges: []bucket.Charge{charge(memoryBuckets[0], 100, 1e-3, 1)}}
	for i := range touches {
		req.Subject = "new:" + strconv.Itoa(i)
		if _, err := s.Take(ctx, req); err != nil {
			tb.Fatal(err)
		}
	}
	memAfter = settledMemory(tb, client) - base
	bucketsAfter, _ = storedBuckets(tb, client, "stale")
	// The touches' own buckets are not full: they stay, and are not
	// counted.
	return bucketsBefore, bucketsAfter - int64(touches), memBefore, memAfter
}

// TestStaleBucketsAreSwept checks that full buckets left in a group that
// is still written to (stale buckets, which cost memory until the whole
// group expires) are deleted by the writes: 20,000 identities write once,
// all of their buckets refill to full, then new identities write 16 times
// per group. Each write samples 4 of its group's fields, so that of 64
// stale buckets a group keeps about 64 × (1 - 4/65)^16 ≈ 23.
func TestStaleBucketsAreSwept(t *testing.T) {
	t.Parallel()
	const identities = 20_000
	groups := groupsFor(identities)
	client := redistest.Start(t).NewClient(t)
	before, after, memBefore, memAfter := sweepStale(t, client, identities, 16*groups, groups)
	t.Logf("stale buckets: %d, then %d after 16 writes per group; used_memory: %d, then %d", before, after, memBefore, memAfter)
	if before != identities || after > before/2 || memAfter >= memBefore {
		t.Errorf("stale buckets: %d, then %d after 16 writes per group (want %d, then at most half); used_memory %d, then %d (want less)", before, after, identities, memBefore, memAfter)
	}
}

// TestFullBucketsAreNotStored checks that a full bucket costs nothing:
// reading fresh buckets writes nothing, a bucket that ends a request full
// leaves its group's hash, and the hash goes with its last bucket, on
// the server's clock as on a test clock.
func TestFullBucketsAreNotStored(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	clock := buckettest.NewClock(time.Unix(1e9, 0))
	for _, tc := range []struct {
		name string
		opts []redisstore.Option
	}{
		{name: "ServerClock"},
		{name: "TestClock", opts: []redisstore.Option{redisstore.WithClock(clock.Now)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Not parallel: the rows share the clock.
			s := newStore(client, append([]redisstore.Option{redisstore.WithKeyPrefix(tc.name)}, tc.opts...)...)
			lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1e-3}
			// The first subject warms the server up (the script, the
			// connection's buffers, the key tables), the second is
			// measured.
			for _, subject := range []string{"user:warmup", "user:alice"} {
				key := redisstore.GroupKey(tc.name, subject)
				stored := func() []string {
					t.Helper()
					fields, err := redisstore.BucketFields(t.Context(), client, key)
					if err != nil {
						t.Fatal(err)
					}
					var buckets []string
					for _, f := range fields {
						buckets = append(buckets, strings.TrimPrefix(f, subject+"/"))
					}
					slices.Sort(buckets)
					return buckets
				}
				req := func(mode bucket.Mode, costs ...float64) bucket.Request {
					r := bucket.Request{Subject: subject, Mode: mode}
					for i, c := range costs {
						r.Charges = append(r.Charges, bucket.Charge{Bucket: memoryBuckets[i], Limit: lim, Cost: c})
					}
					return r
				}
				before := usedMemory(t, client)
				for _, st := range []struct {
					req        bucket.Request
					wantStored []string
				}{
					{req: req(bucket.ModeTake, 0, 0, 0)},
					{req: req(bucket.ModeTake, 1, 2, 0), wantStored: []string{"requests", "tokens"}},
					{req: req(bucket.ModeAdjust, -1), wantStored: []string{"tokens"}},
					{req: req(bucket.ModeAdjust, 0, -5, 3), wantStored: []string{"search"}},
					{req: req(bucket.ModeTake, 0, 0, 0), wantStored: []string{"search"}},
					{req: req(bucket.ModeAdjust, 0, 0, -100)},
				} {
					d := take(t, s, st.req)
					if got := stored(); !slices.Equal(got, st.wantStored) || !d.Allowed {
						t.Fatalf("after %v: allowed %v, buckets %q stored, want %q", st.req.Charges, d.Allowed, got, st.wantStored)
					}
				}
				if n, err := client.Exists(t.Context(), key).Result(); err != nil || n != 0 {
					t.Fatalf("EXISTS %s = %d, %v after every bucket is full; want 0", key, n, err)
				}
				// A stored bucket would cost over 100 bytes.
				if grew := usedMemory(t, client) - before; subject == "user:alice" && grew > 64 {
					t.Errorf("used_memory grew by %d bytes with every bucket full", grew)
				}
			}
		})
	}
	t.Run("RefilledToFull", func(t *testing.T) {
		// A bucket that refilled to full since it was stored leaves at
		// its next charge, even one that costs nothing.
		s := newStore(client, redisstore.WithKeyPrefix("refilled"), redisstore.WithClock(clock.Now))
		lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
		take(t, s, bucket.Request{Subject: "user:bob", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 4}}})
		clock.Advance(4 * time.Second)
		take(t, s, bucket.Request{Subject: "user:bob", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 0}}})
		if n, err := client.Exists(t.Context(), redisstore.GroupKey("refilled", "user:bob")).Result(); err != nil || n != 0 {
			t.Fatalf("EXISTS %s = %d, %v after the bucket refilled; want 0", redisstore.GroupKey("refilled", "user:bob"), n, err)
		}
	})
}

// BenchmarkMemoryPerBucket reports the Redis memory of an active bucket
// (B/bucket) over b.N identities, with one bucket per identity and with
// three, in as many groups as WithGroups advises and in the default
// number: run it with -benchtime=100000x or 1000000x.
func BenchmarkMemoryPerBucket(b *testing.B) {
	client := redistest.Start(b).NewClient(b)
	for _, n := range []int{1, 3} {
		for _, sized := range []bool{true, false} {
			name := fmt.Sprintf("buckets=%d/groups=default", n)
			if sized {
				name = fmt.Sprintf("buckets=%d/groups=buckets/%d", n, perGroup)
			}
			b.Run(name, func(b *testing.B) {
				groups := redisstore.DefaultGroups
				if sized {
					groups = groupsFor(b.N * n)
				}
				got := bytesPerBucket(b, client, b.N, n, groups)
				b.ReportMetric(got, "B/bucket")
			})
		}
	}
}

// BenchmarkStaleSweep reports how many of b.N stale buckets (written once,
// then full) 16 writes per group leave, and the memory they cost before and
// after, with groups sized as WithGroups advises: run it with
// -benchtime=1000000x.
func BenchmarkStaleSweep(b *testing.B) {
	client := redistest.Start(b).NewClient(b)
	groups := groupsFor(b.N)
	before, after, memBefore, memAfter := sweepStale(b, client, b.N, 16*groups, groups)
	b.ReportMetric(float64(after)/float64(before), "stale-left")
	b.ReportMetric(float64(memBefore)/float64(before), "B/bucket-before")
	b.ReportMetric(float64(memAfter)/float64(before), "B/bucket-after")
}

// TestSweepByFillClass checks which buckets a write sweeps: those full by
// their own fill class (the least power of two microseconds in which they
// fill from empty), whatever the other buckets of the group take to fill.
func TestSweepByFillClass(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	clock := buckettest.NewClock(time.Unix(1e9, 0))
	// One group of few buckets, so that every sweep samples all of them
	// (4 per bucket added).
	s := newStore(client, redisstore.WithKeyPrefix("class"), redisstore.WithGroups(1), redisstore.WithClock(clock.Now))
	const key = "class:{g/0}"
	long := bucket.Limit{Capacity: 10, RefillPerSecond: 1e-9}
	// Fills from empty in 1 s, at most 2^20 µs (1.048576 s).
	short := bucket.Limit{Capacity: 1, RefillPerSecond: 1}
	write := func(subject string, lim bucket.Limit) {
		t.Helper()
		take(t, s, bucket.Request{Subject: subject, Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 1}}})
	}
	stored := func() []string {
		t.Helper()
		fields, err := redisstore.BucketFields(t.Context(), client, key)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(fields)
		return fields
	}
	write("a", long)
	write("b", short)
	write("c", short)
	// b and c are full, but not yet by their class: they stay. (d adds a
	// bucket, so the sweep samples 4, all of the group's.)
	clock.Advance(1040 * time.Millisecond)
	write("d", short)
	if got, want := stored(), []string{"a/b", "b/b", "c/b", "d/b"}; !slices.Equal(got, want) {
		t.Fatalf("after 1.04 s: fields %q, want %q", got, want)
	}
	// Now they are full by their class, while a, which fills in 317
	// years, is not, nor d, written 10 ms ago. (e adds 2 buckets, so the
	// sweep samples 8, all of the group's 6.)
	clock.Advance(10 * time.Millisecond)
	take(t, s, bucket.Request{Subject: "e", Charges: []bucket.Charge{{Bucket: "x", Limit: short, Cost: 1}, {Bucket: "y", Limit: short, Cost: 1}}})
	if got, want := stored(), []string{"a/b", "d/b", "e/x", "e/y"}; !slices.Equal(got, want) {
		t.Fatalf("after 1.05 s: fields %q, want %q", got, want)
	}
}
