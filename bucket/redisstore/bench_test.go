package redisstore_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// BenchmarkTakeParallel measures Take under many concurrent callers, as in
// a server: with 1 and 3 buckets, over many subjects or one hot one, with
// coalescing (the default) and without it (WithMaxBatch(1), one script call
// per decision). It reports script calls per decision beside allocations.
func BenchmarkTakeParallel(b *testing.B) {
	srv := redistest.Start(b)
	client := srv.NewClient(b, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries, o.DialerRetries = true, -1, 1 })
	for _, n := range []int{1, 3} {
		for _, hot := range []bool{false, true} {
			for _, maxBatch := range []int{redisstore.DefaultMaxBatch, 1} {
				subjects := "many"
				if hot {
					subjects = "hot"
				}
				name := fmt.Sprintf("buckets=%d/subjects=%s/maxbatch=%d", n, subjects, maxBatch)
				b.Run(name, func(b *testing.B) {
					s := redisstore.New(client, redisstore.WithKeyPrefix(name), redisstore.WithMaxBatch(maxBatch), redisstore.WithTimeout(redisstore.DefaultTimeout*10))
					charges := make([]bucket.Charge, n)
					for i := range charges {
						// Large enough never to deny, so every call writes.
						charges[i] = charge(fmt.Sprint("b", i), 1e12, 1e6, 1)
					}
					if _, err := s.Take(context.Background(), bucket.Request{Subject: "warmup", Charges: charges}); err != nil {
						b.Fatal(err)
					}
					if err := client.ConfigResetStat(context.Background()).Err(); err != nil {
						b.Fatal(err)
					}
					var callers atomic.Int64
					b.ReportAllocs()
					// Many callers per core, as in a server: one call at a
					// time per core would measure round trips, not
					// throughput.
					b.SetParallelism(16)
					b.RunParallel(func(pb *testing.PB) {
						subject := "user:hot"
						if !hot {
							subject = fmt.Sprint("user:", callers.Add(1))
						}
						req := bucket.Request{Subject: subject, Charges: charges}
						for pb.Next() {
							if _, err := s.Take(context.Background(), req); err != nil {
								b.Error(err)
								return
							}
						}
					})
					b.StopTimer()
					stats, err := client.Info(context.Background(), "commandstats").Result()
					if err != nil {
						b.Fatal(err)
					}
					var calls int64
					for _, m := range scriptStats.FindAllStringSubmatch(stats, -1) {
						var v int64
						if _, err := fmt.Sscan(m[1], &v); err != nil {
							b.Fatal(err)
						}
						calls += v
					}
					b.ReportMetric(float64(calls)/float64(b.N), "scripts/op")
				})
			}
		}
	}
}
