package interceptor_test

import (
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// scriptCalls counts the script calls (EVAL, EVALSHA) a Redis served.
func scriptCalls(t *testing.T, rs *redistest.Server) int {
	t.Helper()
	c := rs.NewClient(t)
	info, err := c.Info(t.Context(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, m := range regexp.MustCompile(`(?m)^cmdstat_(?:eval|evalsha):calls=(\d+),`).FindAllStringSubmatch(info, -1) {
		v, err := strconv.Atoi(m[1])
		if err != nil {
			t.Fatal(err)
		}
		n += v
	}
	return n
}

// TestAbusiveCallerCostsNoRedis floods a Redis-backed interceptor with
// calls from one caller far over its limit: once Redis has denied it, the
// denial cache answers in process, so Redis serves fewer than one script
// call per hundred denied calls, and the calls allowed never exceed what
// the bucket could pay.
func TestAbusiveCallerCostsNoRedis(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	cfg := costmap.Config{Buckets: map[string]costmap.BucketConfig{
		"search":   {Capacity: 5, RefillPerSecond: 1},
		"generate": {Capacity: 100, RefillPerSecond: 10},
	}}
	f := newFixtureConfig(t, cfg, redisStore(t, rs))
	before := scriptCalls(t, rs)
	const goroutines, perGoroutine = 8, 400
	var (
		mu              sync.Mutex
		allowed, denied int
	)
	start := time.Now()
	var wg sync.WaitGroup
	for range goroutines {
		wg.Go(func() {
			for range perGoroutine {
				_, err := callSearch(t, f.search, "user:abuser")
				mu.Lock()
				switch {
				case err == nil:
					allowed++
				case connect.CodeOf(err) == connect.CodeResourceExhausted:
					denied++
				default:
					t.Errorf("call failed: %v", err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	calls := scriptCalls(t, rs) - before
	t.Logf("%d allowed, %d denied, %d script calls (%.4f per denied call)", allowed, denied, calls, float64(calls)/float64(denied))
	if denied < goroutines*perGoroutine/2 {
		t.Fatalf("only %d of %d calls denied: the test did not flood", denied, goroutines*perGoroutine)
	}
	if float64(calls) >= 0.01*float64(denied) {
		t.Errorf("Redis served %d script calls for %d denied calls, want fewer than 1 per 100", calls, denied)
	}
	if st := f.ic.Stats(); st.DeniedLocally == 0 || st.DeniedLocally > uint64(denied) {
		t.Errorf("Stats().DeniedLocally = %d of %d denied", st.DeniedLocally, denied)
	}
	// 5 tokens, and 1 a second while the flood lasted.
	if limit := 5 + elapsed.Seconds() + 1; float64(allowed) > limit {
		t.Errorf("%d calls allowed in %v, more than the bucket could pay (%.0f)", allowed, elapsed, limit)
	}
}
