package interceptor_test

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// redisStore returns a store on rs through a client of its own, configured
// as server.WithRedisURL configures one (deadlines honoured, no resends),
// with a long timeout: on a busy test machine a slow store must fail a test
// that is not about failures, never let calls through uncharged.
func redisStore(t *testing.T, rs *redistest.Server) *redisstore.Store {
	t.Helper()
	return redisstore.New(rs.NewClient(t, func(o *redis.Options) {
		o.ContextTimeoutEnabled = true
		o.MaxRetries = -1
		o.DialerRetries = 1
		o.PoolSize = 128
	}), redisstore.WithTimeout(10*time.Second))
}

// TestExactAcrossInstances hammers one identity through three interceptor
// instances (three servers, three Redis clients) that share one Redis. The
// calls allowed never exceed what the bucket can pay, capacity + rate ×
// elapsed (from before the first call was sent to the last answer), and
// reach at least 95% of what it surely could pay while calls were waiting:
// capacity + rate × the time from the first answer (the bucket was full
// until the first decision, so earlier refill was not to be had) to the
// last call sent.
func TestExactAcrossInstances(t *testing.T) {
	t.Parallel()
	const (
		instances  = 3
		goroutines = 240
		// The capacity holds 2 s of refill, so that a scheduling stall of
		// a busy machine does not waste refill; the rate is far below
		// what even a starved machine serves under -race (about 100
		// calls/s with three test suites on two cores), so demand always
		// exceeds supply.
		capacity = 50
		rate     = 25
		duration = 2 * time.Second
	)
	cfg := costmap.Config{Buckets: map[string]costmap.BucketConfig{
		"search":   {Capacity: capacity, RefillPerSecond: rate},
		"generate": {Capacity: 100, RefillPerSecond: 10},
	}}
	rs := redistest.Start(t)
	fixtures := make([]*fixture, instances)
	for i := range fixtures {
		// Fail closed with a long timeout: a store failure must show up
		// as a failed call, never as an uncharged allowed one.
		fixtures[i] = newFixtureConfig(t, cfg, redisStore(t, rs),
			interceptor.WithFailurePolicy(interceptor.FailClosed),
			interceptor.WithStoreTimeout(10*time.Second))
	}
	// Open each client's connection first (on the unlimited procedure), so
	// the measurement is not of 300 concurrent TLS handshakes.
	for _, f := range fixtures {
		if _, err := f.free.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("warm-up"))); err != nil {
			t.Fatal(err)
		}
	}
	var allowed, denied, firstAnswer, lastSent atomic.Int64
	errs := make(chan error, goroutines)
	var wg sync.WaitGroup
	start := time.Now()
	for g := range goroutines {
		f := fixtures[g%instances]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				sent := time.Since(start)
				if sent >= duration {
					return
				}
				for prev := lastSent.Load(); int64(sent) > prev && !lastSent.CompareAndSwap(prev, int64(sent)); prev = lastSent.Load() {
				}
				_, err := callSearch(t, f.search, "user:alice")
				firstAnswer.CompareAndSwap(0, int64(time.Since(start)))
				switch {
				case err == nil:
					allowed.Add(1)
				case connect.CodeOf(err) == connect.CodeResourceExhausted:
					denied.Add(1)
				default:
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		t.Fatalf("call failed: %v", err)
	}
	upper := capacity + rate*elapsed.Seconds()
	lower := capacity + rate*time.Duration(lastSent.Load()-firstAnswer.Load()).Seconds()
	got := float64(allowed.Load())
	t.Logf("allowed %.0f of %d calls; could pay %.1f while calls waited (%.1f%%) and %.1f at most (%.1f%%)",
		got, allowed.Load()+denied.Load(), lower, 100*got/lower, upper, 100*got/upper)
	if denied.Load() == 0 {
		t.Fatal("no call was denied: the load did not exceed the limit, so the test proves nothing")
	}
	if got > upper {
		t.Fatalf("allowed %.0f calls, more than capacity + rate × elapsed = %.1f", got, upper)
	}
	if got < 0.95*lower {
		t.Fatalf("allowed %.0f calls, less than 95%% of the %.1f the bucket could pay while calls waited", got, lower)
	}
}
