package denycache_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/denycache"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

// countingStore counts the calls that reach a store, each standing for one
// Redis command, and can make each call take a round trip's time.
type countingStore struct {
	bucket.Store
	calls atomic.Int64
	rtt   time.Duration
}

func (s *countingStore) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	s.calls.Add(1)
	if s.rtt > 0 {
		time.Sleep(s.rtt)
	}
	return s.Store.Take(ctx, req)
}

// BenchmarkHotDenied is one abusive caller hammering one bucket from many
// goroutines, on the real clock: the bucket refills 10 tokens a second, so
// nearly every call is denied. It reports the store calls paid per denied
// call (the target is below 0.01) and, with a simulated round trip, how the
// in-flight accounting holds the herd back when a token comes back.
func BenchmarkHotDenied(b *testing.B) {
	for _, rtt := range []time.Duration{0, 200 * time.Microsecond} {
		b.Run(fmt.Sprintf("rtt=%v", rtt), func(b *testing.B) {
			mem := memstore.New()
			defer mem.Close()
			store := &countingStore{Store: mem, rtt: rtt}
			cache := denycache.New(store)
			req := bucket.Request{Subject: "user:mallory", Charges: []bucket.Charge{
				{Bucket: "search", Limit: bucket.Limit{Capacity: 10, RefillPerSecond: 10}, Cost: 1},
			}}
			var denied atomic.Int64
			b.ReportAllocs()
			b.SetParallelism(16)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					d, err := cache.Take(ctx, req)
					if err != nil {
						b.Error(err)
						return
					}
					if !d.Allowed {
						denied.Add(1)
					}
				}
			})
			b.StopTimer()
			if n := denied.Load(); n > 0 {
				b.ReportMetric(float64(store.calls.Load())/float64(n), "store-calls/denial")
			}
			st := cache.Stats()
			if st.StoreCalls != uint64(store.calls.Load()) {
				b.Fatalf("Stats().StoreCalls = %d, the store counted %d", st.StoreCalls, store.calls.Load())
			}
		})
	}
}

// BenchmarkLocalDenial is the cost of one local denial of a hot key with a
// request ID, as the limiter sends them, from one goroutine.
func BenchmarkLocalDenial(b *testing.B) {
	mem := memstore.New()
	defer mem.Close()
	cache := denycache.New(mem)
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1e-3}
	drain := bucket.Request{Subject: "user:mallory", Charges: []bucket.Charge{{Bucket: "search", Limit: lim, Cost: 10}}}
	req := bucket.Request{Subject: "user:mallory", ID: "call-1", Charges: []bucket.Charge{{Bucket: "search", Limit: lim, Cost: 1}}}
	ctx := context.Background()
	for _, r := range []bucket.Request{drain, req} {
		if _, err := cache.Take(ctx, r); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if d, _ := cache.Take(ctx, req); d.Allowed {
			b.Fatal("allowed")
		}
	}
	if st := cache.Stats(); st.StoreCalls != 2 {
		b.Fatalf("%d store calls, want 2", st.StoreCalls)
	}
}
