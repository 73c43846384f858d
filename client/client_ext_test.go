package client_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/client"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/internal/prototest"
)

// slow are buckets that barely refill during a test.
func slow() map[string]costmap.BucketConfig {
	return map[string]costmap.BucketConfig{
		"search":   {Capacity: 60, RefillPerSecond: 1},
		"requests": {Capacity: 10, Period: time.Hour},
		"tokens":   {Capacity: 100, Period: time.Hour},
	}
}

// TestQuotaState reads the buckets from a unary call's headers, a
// stream's headers and the trailers of a stream cut off mid-way, over
// every protocol, and hands each change to a subscriber.
func TestQuotaState(t *testing.T) {
	t.Parallel()
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			t.Parallel()
			s := newServer(t, slow())
			ic := newInterceptor(t, client.WithMaxWait(0)) // denials come back at once
			var mu sync.Mutex
			var seen []client.Quota
			defer ic.Subscribe(func(q client.Quota) {
				mu.Lock()
				defer mu.Unlock()
				seen = append(seen, q)
			})()
			search, report := s.clients(ic, p.opts...)

			before := time.Now()
			if _, err := search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q"))); err != nil {
				t.Fatal(err)
			}
			q, ok := ic.Quota("search")
			if !ok || q.Remaining != 59 || q.Capacity != 60 || q.Window != time.Minute || q.Warning {
				t.Fatalf("search after one call: %+v, %v; want 59 of 60 left, window 1m, no warning", q, ok)
			}
			if q.ObservedAt.Before(before) || q.ResetAt.Sub(q.ObservedAt) != time.Second {
				t.Fatalf("search: observed at %v (call at %v), reset at %v; want full again 1s after", q.ObservedAt, before, q.ResetAt)
			}

			// A stream's headers show its reservation: 8 tokens.
			if n, err := s.report(t.Context(), report, "use=8", 8); err != nil || n != 2 {
				t.Fatalf("report: %d messages, %v", n, err)
			}
			if q, _ := ic.Quota("tokens"); q.Remaining != 92 || q.Capacity != 100 {
				t.Fatalf("tokens after a report: %+v, want 92 of 100", q)
			}
			if q, _ := ic.Quota("requests"); q.Remaining != 9 || q.Warning {
				t.Fatalf("requests after a report: %+v, want 9 left", q)
			}

			// This one uses more than it reserved and more than is left:
			// the server cuts it off, and its trailers say the bucket is
			// empty. It is not retried: it delivered messages.
			calls := s.calls.Load()
			n, err := s.report(t.Context(), report, "use=400", 4)
			if connect.CodeOf(err) != connect.CodeResourceExhausted || n == 0 {
				t.Fatalf("greedy report: %d messages, %v; want some, then resource_exhausted", n, err)
			}
			if got := s.calls.Load() - calls; got != 1 {
				t.Fatalf("the cut stream was sent %d times, want once", got)
			}
			q, _ = ic.Quota("tokens")
			if q.Remaining != 0 {
				t.Fatalf("tokens after a cut stream: %+v, want 0 left", q)
			}
			// A denial's metadata (headers for gRPC, the error's metadata
			// for Connect) carries the state too.
			var denial error
			var lastAllowed client.Quota
			// Calls outpace the refill (1/s), so the bucket empties within a
			// few more than 60 calls however slow the machine.
			for range 200 {
				if _, denial = search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q"))); denial != nil {
					break
				}
				lastAllowed, _ = ic.Quota("search")
			}
			q, _ = ic.Quota("search")
			if connect.CodeOf(denial) != connect.CodeResourceExhausted || q.Remaining != 0 || !q.ObservedAt.After(lastAllowed.ObservedAt) {
				t.Fatalf("search after a denial (%v): %+v, want 0 left, observed after %v", denial, q, lastAllowed.ObservedAt)
			}

			mu.Lock()
			defer mu.Unlock()
			var tokens []int64
			for _, q := range seen {
				if q.Bucket == "tokens" {
					tokens = append(tokens, q.Remaining)
				}
			}
			// The first report (92), the greedy one's reservation (88),
			// its cut-off (0).
			if want := []int64{92, 88, 0}; !equal(tokens, want) {
				t.Fatalf("subscriber saw tokens %v, want %v", tokens, want)
			}
		})
	}
}

func equal[T comparable](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestDescribe describes a denial a wait cures, one it does not
// (a cost over capacity), and errors that are not denials.
func TestDescribe(t *testing.T) {
	t.Parallel()
	buckets := slow()
	buckets["search"] = costmap.BucketConfig{Capacity: 1, Period: 1000 * time.Second}
	s := newServer(t, buckets)
	search, report := s.clients(newInterceptor(t)) // RetryInfo beyond the max wait: no retry
	if _, err := search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q"))); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q")))
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Fatalf("a denial asking for a wait past the max wait took %v to return", elapsed)
	}
	l, ok := client.Describe(err)
	if !ok || l.Bucket != "search" || l.Subject != "ip:127.0.0.1" || l.RetryAfter <= 990*time.Second || l.RetryAfter > 1000*time.Second ||
		!strings.Contains(l.Message, `rate limit exceeded for bucket "search"`) {
		t.Fatalf("Describe(%v) = %+v, %v", err, l, ok)
	}
	if l2, ok := client.Describe(errors.Join(errors.New("context"), err)); !ok || l2 != l {
		t.Fatalf("Describe of a wrapped denial = %+v, %v; want %+v", l2, ok, l)
	}

	_, err = s.report(t.Context(), report, "use=4", 1000)
	if l, ok := client.Describe(err); !ok || l.Bucket != "tokens" || l.RetryAfter != 0 || !strings.Contains(l.Message, "can never be allowed") {
		t.Fatalf("Describe(%v) = %+v, %v; want bucket tokens, no retry", err, l, ok)
	}

	for _, err := range []error{nil, errors.New("boom"), connect.NewError(connect.CodeUnavailable, errors.New("down"))} {
		if l, ok := client.Describe(err); ok {
			t.Errorf("Describe(%v) = %+v, true; want false", err, l)
		}
	}
}

// fast are buckets that refill within tens of milliseconds.
func fast() map[string]costmap.BucketConfig {
	return map[string]costmap.BucketConfig{
		"search":   {Capacity: 1, RefillPerSecond: 20},
		"requests": {Capacity: 1, RefillPerSecond: 20},
		"tokens":   {Capacity: 1000, RefillPerSecond: 1000},
	}
}

// TestRetryAfterRetryInfo: the second call in a row is denied with a
// RetryInfo of at most 50ms, retried after it, and succeeds, for a unary
// call and a server stream.
func TestRetryAfterRetryInfo(t *testing.T) {
	t.Parallel()
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			t.Parallel()
			s := newServer(t, fast())
			search, report := s.clients(newInterceptor(t), p.opts...)
			for i := range 2 {
				if _, err := search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q"))); err != nil {
					t.Fatalf("search %d: %v", i, err)
				}
			}
			for i := range 2 {
				if n, err := s.report(t.Context(), report, "use=8", 8); err != nil || n != 2 {
					t.Fatalf("report %d: %d messages, %v", i, n, err)
				}
			}
			// Each second call was denied, then retried once.
			if calls, denials := s.calls.Load(), s.denials.Load(); denials < 2 || calls != 4+denials {
				t.Fatalf("server saw %d calls and %d denials; want at least 2 denials, each retried", calls, denials)
			}
		})
	}
}

// TestNoRetryWithoutRetryInfo: a cost over capacity and a concurrency
// limit are denied without RetryInfo, so they are not sent again.
func TestNoRetryWithoutRetryInfo(t *testing.T) {
	t.Parallel()
	s := newServer(t, fast())
	_, report := s.clients(newInterceptor(t))

	if _, err := s.report(t.Context(), report, "use=4", 5000); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("report over capacity: %v", err)
	}
	if calls := s.calls.Load(); calls != 1 {
		t.Fatalf("a call over capacity was sent %d times", calls)
	}

	// One report holds the caller's only stream slot.
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	holding, err := report.CallServerStream(ctx, connect.NewRequest(prototest.ReportRequest(s.svc, "hold", 4)))
	if err != nil || !holding.Receive() {
		t.Fatalf("holding report: %v %v", err, holding.Err())
	}
	defer holding.Close()
	time.Sleep(60 * time.Millisecond) // the requests bucket refills
	calls := s.calls.Load()
	_, err = s.report(t.Context(), report, "use=4", 4)
	if l, ok := client.Describe(err); !ok || l.Bucket != "streams" || l.RetryAfter != 0 {
		t.Fatalf("report over the concurrency limit: %v, described %+v", err, l)
	}
	if got := s.calls.Load() - calls; got != 1 {
		t.Fatalf("a call over the concurrency limit was sent %d times", got)
	}
}

// TestPacingPreventsDenials sends calls in a row faster than the bucket
// refills: paced, the server denies none; unpaced, it denies many.
func TestPacingPreventsDenials(t *testing.T) {
	t.Parallel()
	buckets := fast()
	// RateLimit-Policy's w is whole seconds: w=1 says exactly 20/s.
	buckets["search"] = costmap.BucketConfig{Capacity: 20, RefillPerSecond: 20}
	for _, tc := range []struct {
		name        string
		opts        []client.Option
		wantDenials bool
	}{
		{"paced", []client.Option{client.WithCost(searchProc, "search", 1)}, false},
		{"unpaced", []client.Option{client.WithoutRetry()}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newServer(t, buckets)
			search, _ := s.clients(newInterceptor(t, tc.opts...))
			const calls = 40
			start := time.Now()
			denied := 0
			for range calls {
				_, err := search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q")))
				switch {
				case connect.CodeOf(err) == connect.CodeResourceExhausted:
					denied++
				case err != nil:
					t.Fatal(err)
				}
			}
			elapsed := time.Since(start)
			t.Logf("%d calls in %v: %d denied by the server, %d failed", calls, elapsed.Round(time.Millisecond), s.denials.Load(), denied)
			if tc.wantDenials != (s.denials.Load() > 0) {
				t.Fatalf("server denied %d calls", s.denials.Load())
			}
			// 20 at once, then 20 a second.
			if !tc.wantDenials && elapsed < (calls-20)*50*time.Millisecond {
				t.Fatalf("%d paced calls took %v, less than the bucket allows", calls, elapsed)
			}
		})
	}
}

// TestCancelDuringRetryWait cancels a call while it waits for its retry:
// it ends at once with canceled, and is not sent again. A call whose
// deadline comes before the RetryInfo's wait does not wait at all.
func TestCancelDuringRetryWait(t *testing.T) {
	t.Parallel()
	buckets := fast()
	buckets["search"] = costmap.BucketConfig{Capacity: 1, RefillPerSecond: 0.5} // a 2s wait
	s := newServer(t, buckets)
	search, _ := s.clients(newInterceptor(t))
	if _, err := search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q"))); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	_, err := search.CallUnary(ctx, connect.NewRequest(wrapperspb.String("q")))
	if elapsed := time.Since(start); connect.CodeOf(err) != connect.CodeCanceled || elapsed > time.Second {
		t.Fatalf("canceled during the wait: %v after %v; want canceled at once", err, elapsed)
	}

	ctx, cancel = context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	start = time.Now()
	_, err = search.CallUnary(ctx, connect.NewRequest(wrapperspb.String("q")))
	if elapsed := time.Since(start); connect.CodeOf(err) != connect.CodeResourceExhausted || elapsed > 400*time.Millisecond {
		t.Fatalf("deadline before the wait ends: %v after %v; want the denial at once", err, elapsed)
	}
	if calls := s.calls.Load(); calls != 3 {
		t.Fatalf("server saw %d calls, want 3: no retry was sent", calls)
	}
}
