package redisstore_test

import (
	"context"
	"fmt"
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

// bytesPerBucket fills count identities with n buckets each into an empty
// database of client's server and returns the growth of used_memory per
// bucket, after checking that every identity is stored.
func bytesPerBucket(tb testing.TB, client *redis.Client, count, n int) float64 {
	tb.Helper()
	ctx := context.Background()
	if err := client.FlushDB(ctx).Err(); err != nil {
		tb.Fatal(err)
	}
	s := newStore(client, redisstore.WithKeyPrefix("cl"))
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
	// charge, and the database holds something for every identity.
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
	if keys < int64(count) {
		tb.Fatalf("%d keys for %d identities", keys, count)
	}
	return float64(after-before) / float64(count*n)
}

// TestMemoryPerBucket measures what an active bucket costs in Redis memory
// (used_memory: keys, values, TTLs and key tables included) over 20,000
// identities ("user:<n>") with one bucket each and with three (named
// "requests", "tokens" and "search"), so that a change of the storage
// format that costs memory fails it. The bounds leave a few bytes per
// bucket for allocator noise. The format shares one key per subject, so
// that a subject with three buckets costs far less per bucket than one
// with a single bucket, where the key and its TTL (about 115 bytes with an
// empty value) dominate: the ratio checks that sharing, which the string
// key per bucket of earlier versions did not have (161 bytes per bucket
// with three against 176 with one). BenchmarkMemoryPerBucket measures
// larger counts.
func TestMemoryPerBucket(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	got := make(map[int]float64)
	for _, tc := range []struct {
		buckets int
		wantMax float64
	}{
		// Measured: 162 and 64.8 (20,000 identities), 160.6 and 64.2
		// (1,000,000). The targets of issue 9 are 100 and 64: see the
		// package doc for why one bucket cannot reach 100 with a key per
		// subject.
		{buckets: 1, wantMax: 166},
		{buckets: 3, wantMax: 67},
	} {
		// Not parallel: the rows share the server, and each measures it.
		got[tc.buckets] = bytesPerBucket(t, client, 20_000, tc.buckets)
		t.Logf("%d bucket(s) per identity: %.1f bytes per bucket", tc.buckets, got[tc.buckets])
		// A bucket costs at least its name and value: a measurement
		// below that measured nothing.
		if got[tc.buckets] < 10 || got[tc.buckets] > tc.wantMax {
			t.Errorf("%d bucket(s) per identity: %.1f bytes per bucket, want from 10 to %v", tc.buckets, got[tc.buckets], tc.wantMax)
		}
	}
	if ratio := got[3] / got[1]; ratio > 0.45 {
		t.Errorf("a bucket of a subject with three costs %.2f of one of a subject with one, want at most 0.45: the buckets of a subject do not share a key", ratio)
	}
}

// TestFullBucketsAreNotStored checks that a full bucket costs nothing:
// reading fresh buckets writes nothing, a bucket that ends a request full
// leaves its subject's hash, and the hash goes with its last bucket, on
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
				key := tc.name + ":{" + subject + "}"
				stored := func() []string {
					t.Helper()
					fields, err := client.HKeys(t.Context(), key).Result()
					if err != nil {
						t.Fatal(err)
					}
					slices.Sort(fields)
					return fields
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
		if n, err := client.Exists(t.Context(), "refilled:{user:bob}").Result(); err != nil || n != 0 {
			t.Fatalf("EXISTS refilled:{user:bob} = %d, %v after the bucket refilled; want 0", n, err)
		}
	})
}

// BenchmarkMemoryPerBucket reports the Redis memory of an active bucket
// (B/bucket) over b.N identities, with one bucket per identity and with
// three: run it with -benchtime=100000x or 1000000x.
func BenchmarkMemoryPerBucket(b *testing.B) {
	client := redistest.Start(b).NewClient(b)
	for _, n := range []int{1, 3} {
		b.Run(fmt.Sprintf("buckets=%d", n), func(b *testing.B) {
			got := bytesPerBucket(b, client, b.N, n)
			b.ReportMetric(got, "B/bucket")
		})
	}
}
