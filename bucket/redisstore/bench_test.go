package redisstore_test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

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
					cpu := startCPU(b, client)
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
					cpu.report(b)
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

// BenchmarkTakeSerial measures Take with one caller at a time, over many
// subjects: the latency of light traffic, where every call is a batch of
// its own.
func BenchmarkTakeSerial(b *testing.B) {
	srv := redistest.Start(b)
	client := srv.NewClient(b, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries, o.DialerRetries = true, -1, 1 })
	s := redisstore.New(client, redisstore.WithKeyPrefix("serial"))
	charges := []bucket.Charge{charge("b", 1e12, 1e6, 1)}
	subjects := make([]string, 1<<16)
	for i := range subjects {
		subjects[i] = fmt.Sprint("user:", i)
	}
	ctx := context.Background()
	if _, err := s.Take(ctx, bucket.Request{Subject: "warmup", Charges: charges}); err != nil {
		b.Fatal(err)
	}
	cpu := startCPU(b, client)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := s.Take(ctx, bucket.Request{Subject: subjects[i%len(subjects)], Charges: charges}); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	cpu.report(b)
}

// cpuUse is the CPU time used so far by this process and by the Redis
// server, so that a benchmark can report both per operation: on a shared
// machine they vary less than the time per operation does.
type cpuUse struct {
	client redis.UniversalClient
	self   time.Duration
	server float64
	cmds   int64
}

// redisCPU matches the CPU times of INFO cpu, in seconds.
var redisCPU = regexp.MustCompile(`(?m)^used_cpu_(?:sys|user):([0-9.]+)`)

// redisCalls matches the call counts of INFO commandstats.
var redisCalls = regexp.MustCompile(`(?m)^cmdstat_[^:]+:calls=(\d+),`)

func startCPU(b *testing.B, client redis.UniversalClient) *cpuUse {
	b.Helper()
	c := &cpuUse{client: client}
	c.self, c.server, c.cmds = c.read(b)
	return c
}

// read returns this process's CPU time, the server's in seconds and how
// many commands the server ran.
func (c *cpuUse) read(b *testing.B) (time.Duration, float64, int64) {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	self := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	info, err := c.client.Info(context.Background(), "cpu", "commandstats").Result()
	if err != nil {
		b.Fatal(err)
	}
	var server float64
	for _, m := range redisCPU.FindAllStringSubmatch(info, -1) {
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			b.Fatal(err)
		}
		server += v
	}
	var cmds int64
	for _, m := range redisCalls.FindAllStringSubmatch(info, -1) {
		v, err := strconv.ParseInt(m[1], 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		cmds += v
	}
	return self, server, cmds
}

// report reports the client's and the server's CPU time and the server's
// commands (scripts and the commands they ran, and INFO) per operation
// since startCPU.
func (c *cpuUse) report(b *testing.B) {
	b.Helper()
	self, server, cmds := c.read(b)
	n := float64(b.N)
	b.ReportMetric(float64(self-c.self)/float64(time.Microsecond)/n, "client-µs/op")
	b.ReportMetric((server-c.server)*1e6/n, "redis-µs/op")
	b.ReportMetric(float64(cmds-c.cmds-1)/n, "redis-cmds/op")
}
