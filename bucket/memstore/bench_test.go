package memstore_test

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

// benchLimit never denies in a benchmark: a charge of one token refills in
// a nanosecond, so every Take finds its bucket full again and charges it.
var benchLimit = bucket.Limit{Capacity: 1e12, RefillPerSecond: 1e9}

// benchSubjects returns n distinct subjects.
func benchSubjects(n int) []string {
	subjects := make([]string, n)
	for i := range subjects {
		subjects[i] = "user:" + strconv.Itoa(i)
	}
	return subjects
}

// BenchmarkTake measures one decision of a one-bucket request on an
// existing bucket, with the decision's buckets in a per-goroutine
// [bucket.Request.Into] array: spread over 4096 subjects in a pseudo-random
// order ("many", which rarely share a shard's lock) and on one hot subject
// (every goroutine on one lock), at 1, 16, 128 and 512 goroutines. It
// reports decisions per second besides ns/op, which is wall time per
// decision across all goroutines.
func BenchmarkTake(b *testing.B) {
	one := []bucket.Charge{{Bucket: "search", Limit: benchLimit, Cost: 1}}
	subjects := benchSubjects(4096)
	for _, sc := range []struct {
		name     string
		subjects []string
	}{
		{"many", subjects},
		{"hot", subjects[:1]},
	} {
		for _, g := range []int{1, 16, 128, 512} {
			b.Run(fmt.Sprintf("%s/goroutines=%d", sc.name, g), func(b *testing.B) {
				benchTake(b, one, sc.subjects, g, true)
			})
		}
	}
}

// BenchmarkTakeAlloc is [BenchmarkTake] at 16 goroutines without an Into
// array, as a caller that does not reuse one decides: the decision then
// allocates its buckets (once, before the lock is taken). It also measures
// three-bucket requests, with and without Into.
func BenchmarkTakeAlloc(b *testing.B) {
	one := []bucket.Charge{{Bucket: "search", Limit: benchLimit, Cost: 1}}
	three := []bucket.Charge{
		{Bucket: "requests", Limit: benchLimit, Cost: 1},
		{Bucket: "tokens", Limit: benchLimit, Cost: 512},
		{Bucket: "all", Limit: benchLimit, Cost: 512},
	}
	subjects := benchSubjects(4096)
	for _, bc := range []struct {
		name    string
		charges []bucket.Charge
		into    bool
	}{
		{"1bucket/into=false", one, false},
		{"3buckets/into=true", three, true},
		{"3buckets/into=false", three, false},
	} {
		for _, sc := range []struct {
			name     string
			subjects []string
		}{
			{"many", subjects},
			{"hot", subjects[:1]},
		} {
			b.Run(bc.name+"/"+sc.name, func(b *testing.B) {
				benchTake(b, bc.charges, sc.subjects, 16, bc.into)
			})
		}
	}
}

// BenchmarkTakeDenied measures a hot caller that keeps asking for what
// its buckets cannot pay: one subject whose bucket of 100 tokens is empty
// (it refills one token in a thousand seconds, so every call of the run
// is denied), alone or with a second bucket that could pay (as the
// limiter charges a procedure's bucket with a shared budget), at 1, 16,
// 128 and 512 goroutines. Calls are denied from the shard's snapshot
// after the first two.
func BenchmarkTakeDenied(b *testing.B) {
	empty := bucket.Charge{Bucket: "search", Limit: bucket.Limit{Capacity: 100, RefillPerSecond: 1e-3}, Cost: 1}
	budget := bucket.Charge{Bucket: "budget", Limit: benchLimit, Cost: 1}
	for _, bc := range []struct {
		name    string
		charges []bucket.Charge
	}{
		{"1bucket", []bucket.Charge{empty}},
		{"2buckets", []bucket.Charge{budget, empty}},
	} {
		for _, g := range []int{1, 16, 128, 512} {
			b.Run(fmt.Sprintf("%s/goroutines=%d", bc.name, g), func(b *testing.B) {
				s := memstore.New()
				b.Cleanup(func() { _ = s.Close() })
				ctx := context.Background()
				for range 100 {
					if _, err := s.Take(ctx, bucket.Request{Subject: "hot", Charges: bc.charges}); err != nil {
						b.Fatal(err)
					}
				}
				body := func(more func() bool) {
					into := make([]bucket.BucketState, len(bc.charges))
					for more() {
						d, err := s.Take(ctx, bucket.Request{Subject: "hot", Charges: bc.charges, Into: into})
						if err != nil || d.Allowed {
							b.Fatalf("Take: %+v, %v; want denied", d, err)
						}
					}
				}
				b.ReportAllocs()
				if g == 1 {
					body(b.Loop)
				} else {
					procs := runtime.GOMAXPROCS(0)
					b.SetParallelism((g + procs - 1) / procs)
					b.RunParallel(func(pb *testing.PB) { body(pb.Next) })
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
			})
		}
	}
}

// benchTake runs Take with charges on subjects from g goroutines: one
// plain loop for g = 1, else b.RunParallel with enough parallelism for at
// least g goroutines.
func benchTake(b *testing.B, charges []bucket.Charge, subjects []string, g int, into bool) {
	s := memstore.New()
	b.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	for _, subject := range subjects {
		if _, err := s.Take(ctx, bucket.Request{Subject: subject, Charges: charges}); err != nil {
			b.Fatal(err)
		}
	}
	var next atomic.Uint64
	body := func(more func() bool) {
		i := next.Add(7919)
		var buf []bucket.BucketState
		if into {
			buf = make([]bucket.BucketState, len(charges))
		}
		n := uint64(len(subjects))
		for more() {
			// A pseudo-random order: traffic from many subjects does not
			// arrive in the order their buckets were made in.
			i = i*6364136223846793005 + 1442695040888963407
			d, err := s.Take(ctx, bucket.Request{Subject: subjects[(i>>33)%n], Charges: charges, Into: buf})
			if err != nil || !d.Allowed {
				b.Fatalf("Take: %+v, %v", d, err)
			}
		}
	}
	b.ReportAllocs()
	if g == 1 {
		body(b.Loop)
	} else {
		procs := runtime.GOMAXPROCS(0)
		b.SetParallelism((g + procs - 1) / procs)
		b.RunParallel(func(pb *testing.PB) { body(pb.Next) })
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
}

// BenchmarkTakeNew measures a Take that adds a bucket: each call charges a
// subject the Store has not seen, so the Store grows by one bucket a call
// (its arrays grow by a quarter when full, so their allocations are
// amortised). The decision's buckets go to an Into array.
func BenchmarkTakeNew(b *testing.B) {
	const n = 1 << 20
	s := memstore.New(memstore.WithSweepInterval(0), memstore.WithMaxBuckets(2*n))
	ctx := context.Background()
	charges := []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 10, RefillPerSecond: 1}, Cost: 1}}
	subjects := benchSubjects(n)
	buf := make([]bucket.BucketState, 1)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if i == len(subjects) {
			// Start again with an empty Store.
			b.StopTimer()
			s = memstore.New(memstore.WithSweepInterval(0), memstore.WithMaxBuckets(2*n))
			i = 0
			b.StartTimer()
		}
		if _, err := s.Take(ctx, bucket.Request{Subject: subjects[i], Charges: charges, Into: buf}); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkMemoryPerBucket reports the heap a Store spends per bucket
// (B/bucket) when it holds 100k and 1M buckets of distinct subjects,
// measured as the growth of runtime.MemStats.HeapAlloc after a GC, not
// counting the subject and bucket name strings, which the Store shares with
// the requests. DefaultMaxBuckets documents the result.
func BenchmarkMemoryPerBucket(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprintf("buckets=%d", n), func(b *testing.B) {
			subjects := benchSubjects(n)
			charges := []bucket.Charge{{Bucket: "search", Limit: bucket.Limit{Capacity: 10, RefillPerSecond: 1}, Cost: 1}}
			ctx := context.Background()
			for b.Loop() {
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				s := memstore.New(memstore.WithSweepInterval(0))
				for _, subject := range subjects {
					if _, err := s.Take(ctx, bucket.Request{Subject: subject, Charges: charges}); err != nil {
						b.Fatal(err)
					}
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				if s.Len() != n {
					b.Fatalf("Len = %d, want %d", s.Len(), n)
				}
				b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(n), "B/bucket")
				runtime.KeepAlive(s)
			}
		})
	}
}

// BenchmarkTakeFlood measures a Take that adds a bucket to a shard at its
// bound, so that every call evicts one.
func BenchmarkTakeFlood(b *testing.B) {
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := memstore.New(memstore.WithSweepInterval(0), memstore.WithMaxBuckets(64*1024), memstore.WithClock(func() time.Time { return clock }))
	b.Cleanup(func() { _ = s.Close() })
	subjects := benchSubjects(1 << 20)
	ctx := context.Background()
	charges := []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 10, RefillPerSecond: 1}}}
	buf := make([]bucket.BucketState, 1)
	take := func(i int) {
		charges[0].Cost = float64(1 + i%9)
		if _, err := s.Take(ctx, bucket.Request{Subject: subjects[i%len(subjects)], Charges: charges, Into: buf}); err != nil {
			b.Fatal(err)
		}
	}
	for i := range 2 * 64 * 1024 {
		take(i)
	}
	b.ReportAllocs()
	i := 2 * 64 * 1024
	for b.Loop() {
		take(i)
		i++
	}
	if s.Evictions() == 0 {
		b.Fatal("no evictions")
	}
}
