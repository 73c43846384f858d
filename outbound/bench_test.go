package outbound_test

import (
	"testing"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/internal/redistest"
	"github.com/connectlimit/connectlimit/outbound"
)

// BenchmarkWait measures a Wait and a Done that never wait: the limiter's
// own cost on top of one store call.
func BenchmarkWait(b *testing.B) {
	ample := bucket.Limit{Capacity: 1e12, RefillPerSecond: 1e12}
	b.Run("memstore", func(b *testing.B) {
		store := memstore.New()
		defer store.Close()
		benchWait(b, store, ample)
	})
	b.Run("redisstore", func(b *testing.B) {
		rs := redistest.Start(b)
		benchWait(b, redisstore.New(rs.NewClient(b)), ample)
	})
}

func benchWait(b *testing.B, store bucket.Store, limit bucket.Limit) {
	lim, err := outbound.New(store, upstream, limit, quiet, outbound.WithoutMaxInFlight())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			p, err := lim.Wait(b.Context(), 1)
			if err != nil {
				b.Error(err)
				return
			}
			p.Done(outbound.Feedback{})
		}
	})
}
