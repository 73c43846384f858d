package memstore_test

import (
	"context"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

// BenchmarkTake measures one decision, in parallel on every core: on one
// hot subject (all goroutines on one shard lock) and spread over many
// subjects, with one bucket and with three.
func BenchmarkTake(b *testing.B) {
	lim := bucket.Limit{Capacity: 1e12, RefillPerSecond: 1e9}
	one := []bucket.Charge{{Bucket: "search", Limit: lim, Cost: 1}}
	three := []bucket.Charge{
		{Bucket: "requests", Limit: lim, Cost: 1},
		{Bucket: "tokens", Limit: lim, Cost: 512},
		{Bucket: "all", Limit: lim, Cost: 512},
	}
	subjects := make([]string, 4096)
	for i := range subjects {
		subjects[i] = "user:" + strconv.Itoa(i)
	}
	for _, bc := range []struct {
		name     string
		charges  []bucket.Charge
		subjects []string
	}{
		{"1bucket/1subject", one, subjects[:1]},
		{"1bucket/4096subjects", one, subjects},
		{"3buckets/1subject", three, subjects[:1]},
		{"3buckets/4096subjects", three, subjects},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := memstore.New()
			b.Cleanup(func() { _ = s.Close() })
			ctx := context.Background()
			var next atomic.Uint64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				i := next.Add(7919)
				for pb.Next() {
					i++
					req := bucket.Request{Subject: bc.subjects[i%uint64(len(bc.subjects))], Charges: bc.charges}
					if d, err := s.Take(ctx, req); err != nil || !d.Allowed {
						b.Fatalf("Take: %+v, %v", d, err)
					}
				}
			})
		})
	}
}

// BenchmarkMemoryPerBucket reports the heap a Store spends per bucket
// (B/bucket) when it holds 100k buckets of distinct subjects, not counting
// the subject and bucket name strings, which the Store shares with the
// requests. DefaultMaxBuckets documents the result.
func BenchmarkMemoryPerBucket(b *testing.B) {
	const n = 100_000
	subjects := make([]string, n)
	for i := range subjects {
		subjects[i] = "user:" + strconv.Itoa(i)
	}
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
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/bucket")
		runtime.KeepAlive(s)
	}
}

// BenchmarkTakeFlood measures a Take that adds a bucket to a shard at its
// bound, so that every call evicts one.
func BenchmarkTakeFlood(b *testing.B) {
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := memstore.New(memstore.WithSweepInterval(0), memstore.WithMaxBuckets(64*1024), memstore.WithClock(func() time.Time { return clock }))
	b.Cleanup(func() { _ = s.Close() })
	subjects := make([]string, 1<<20)
	for i := range subjects {
		subjects[i] = "user:" + strconv.Itoa(i)
	}
	ctx := context.Background()
	charges := []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 10, RefillPerSecond: 1}}}
	take := func(i int) {
		charges[0].Cost = float64(1 + i%9)
		if _, err := s.Take(ctx, bucket.Request{Subject: subjects[i%len(subjects)], Charges: charges}); err != nil {
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
