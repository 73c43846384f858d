package main

import (
	"context"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// TestColdBurstStaysExact is the cold burst of a fresh deployment: two
// example instances, just started with -redis and the default configuration
// (failure policy local, 100ms store timeout), get 500 concurrent Search
// calls from one API key at once, while other work keeps every CPU busy.
// Calls that wait for their turn at Redis are not store failures, so none
// is decided locally, and the instances together allow at most what the
// key's bucket holds: capacity + rate × elapsed (free tier: 120, then 2/s).
func TestColdBurstStaysExact(t *testing.T) {
	t.Parallel()
	const (
		calls    = 500
		capacity = 120
		rate     = 2
		key      = "demo-key-alice"
		tries    = 3
	)
	for try := range tries {
		rs := redistest.Start(t)
		urls := []string{
			// The built-in configuration, as a user would run it.
			serveExample(t, "-redis", "redis://"+rs.Addr()+"/0"),
			serveExample(t, "-redis", "redis://"+rs.Addr()+"/0"),
		}
		// Keep every CPU busy, as other work on a production node does.
		busy, stopBusy := context.WithCancel(t.Context())
		var burners sync.WaitGroup
		for range runtime.GOMAXPROCS(0) {
			burners.Go(func() {
				for n := 0; busy.Err() == nil; n++ {
					_ = n * n
				}
			})
		}
		var allowed, denied, local atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, calls)
		begin := make(chan struct{})
		for i := range calls {
			client := aiservicev1connect.NewAIServiceClient(http.DefaultClient, urls[i%len(urls)])
			wg.Go(func() {
				<-begin
				req := connect.NewRequest(&aiservicev1.SearchRequest{Query: "cold burst", TopK: 1})
				req.Header().Set("Authorization", "Bearer "+key)
				res, err := client.Search(t.Context(), req)
				switch {
				case err == nil:
					allowed.Add(1)
					// A local decision would report the local share of
					// the bucket (q=60).
					if q := limitParams(t, res.Header().Get("RateLimit-Policy"), "q")["search"]; q != capacity {
						local.Add(1)
					}
				case connect.CodeOf(err) == connect.CodeResourceExhausted:
					denied.Add(1)
				default:
					errs <- err
				}
			})
		}
		start := time.Now()
		close(begin)
		wg.Wait()
		elapsed := time.Since(start)
		stopBusy()
		burners.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("try %d: call failed: %v", try, err)
		}
		bound := capacity + rate*elapsed.Seconds()
		t.Logf("try %d: %d allowed, %d denied in %v; bound capacity + rate × elapsed = %.1f",
			try, allowed.Load(), denied.Load(), elapsed.Round(time.Millisecond), bound)
		if got := float64(allowed.Load()); got > bound {
			t.Errorf("try %d: %v calls allowed, more than capacity + rate × elapsed = %.1f", try, got, bound)
		}
		if local.Load() > 0 {
			t.Errorf("try %d: %d calls were decided locally: waiting for Redis counted as a store failure", try, local.Load())
		}
		if allowed.Load() < capacity {
			t.Errorf("try %d: only %d calls allowed; the bucket held %d", try, allowed.Load(), capacity)
		}
	}
}
