package memstore_test

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"

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
