package interceptor_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/redistest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// stores runs a test against the in-memory store and a real Redis.
func stores(t *testing.T, run func(t *testing.T, store bucket.Store)) {
	t.Run("memory", func(t *testing.T) {
		t.Parallel()
		run(t, nil)
	})
	t.Run("redis", func(t *testing.T) {
		t.Parallel()
		run(t, redisStore(t, redistest.Start(t)))
	})
}

// TestSettleExactness makes many calls with random estimates and actual
// usages, some of them concurrently: in the end the bucket has been charged
// exactly the sum of the actual usages.
func TestSettleExactness(t *testing.T) {
	t.Parallel()
	stores(t, func(t *testing.T, store bucket.Store) {
		cfg := aiConfig()
		cfg.Buckets["tokens"] = bucketConfig(1e6)
		f := newAIFixture(t, cfg, store)
		rng := rand.New(rand.NewPCG(1, 2))
		type job struct{ estimate, actual int }
		jobs := make([]job, 300)
		want := 0
		for i := range jobs {
			jobs[i] = job{estimate: 1 + rng.IntN(200), actual: rng.IntN(400)}
			want += jobs[i].actual
		}
		var wg sync.WaitGroup
		errs := make(chan error, len(jobs))
		for w := range 6 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < len(jobs); i += 6 {
					j := jobs[i]
					res, err := f.ask.CallUnary(t.Context(), f.request(fmt.Sprint("use=", j.actual), int32(j.estimate)))
					if err != nil {
						errs <- err
						return
					}
					// Refunds never lift a bucket above capacity.
					if h := res.Header().Get("RateLimit"); h == "" {
						errs <- errors.New("no RateLimit header")
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		requests, tokens := f.levels(t, "ip:127.0.0.1")
		if charged := 1e6 - tokens; !near(charged, float64(want)) {
			t.Fatalf("tokens charged %v, want the sum of actual usages %d", charged, want)
		}
		if !near(1000-requests, float64(len(jobs))) {
			t.Fatalf("requests charged %v, want %d", 1000-requests, len(jobs))
		}
	})
}

func bucketConfig(capacity float64) costmapBucket {
	return costmapBucket{Capacity: capacity, RefillPerSecond: 1e-9}
}

func TestSettleRules(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		topic       string
		estimate    int32
		wantCode    connect.Code
		wantTokens  float64 // charged from "tokens"
		wantRequest float64 // charged from "requests"
	}{
		{"used less: refund", "use=30", 100, 0, 30, 1},
		{"used more: charged extra, never denied", "use=250", 100, 0, 250, 1},
		{"used nothing", "use=0", 100, 0, 0, 1},
		{"error before any work: estimate refunded, fixed cost kept", "fail", 100, connect.CodeFailedPrecondition, 0, 1},
		{"error after reported work: settled to the report", "report=42.5", 100, connect.CodeUnavailable, 42.5, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newAIFixture(t, aiConfig(), nil)
			res, err := f.ask.CallUnary(t.Context(), f.request(tc.topic, tc.estimate))
			if connect.CodeOf(err) != tc.wantCode && !(tc.wantCode == 0 && err == nil) {
				t.Fatalf("err = %v, want code %v", err, tc.wantCode)
			}
			requests, tokens := f.levels(t, "ip:127.0.0.1")
			if !near(1000-tokens, tc.wantTokens) || !near(1000-requests, tc.wantRequest) {
				t.Fatalf("charged tokens %v requests %v, want %v and %v", 1000-tokens, 1000-requests, tc.wantTokens, tc.wantRequest)
			}
			// The headers report the settled state.
			if err == nil {
				if got, want := res.Header().Get("RateLimit"), fmt.Sprintf(`"requests";r=%d;t=`, int(requests)); got[:len(want)] != want {
					t.Fatalf("RateLimit = %q, want prefix %q", got, want)
				}
			}
		})
	}
}

func TestRefundNeverExceedsCapacity(t *testing.T) {
	t.Parallel()
	f := newAIFixture(t, aiConfig(), nil)
	for range 5 {
		if _, err := f.ask.CallUnary(t.Context(), f.request("use=0", 900)); err != nil {
			t.Fatal(err)
		}
		if _, tokens := f.levels(t, "ip:127.0.0.1"); tokens > 1000 {
			t.Fatalf("tokens = %v after a refund, above capacity 1000", tokens)
		}
	}
}

func TestAllOrNothingAcrossBuckets(t *testing.T) {
	t.Parallel()
	stores(t, func(t *testing.T, store bucket.Store) {
		f := newAIFixture(t, aiConfig(), store)
		// Use 750 of 1000 tokens.
		if _, err := f.ask.CallUnary(t.Context(), f.request("use=750", 750)); err != nil {
			t.Fatal(err)
		}
		requestsBefore, tokensBefore := f.levels(t, "ip:127.0.0.1")
		// 250 tokens left: a 300-token estimate is denied and charges no
		// request either.
		_, err := f.ask.CallUnary(t.Context(), f.request("use=0", 300))
		if connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("err = %v, want resource_exhausted", err)
		}
		if r, tk := f.levels(t, "ip:127.0.0.1"); !near(r, requestsBefore) || !near(tk, tokensBefore) {
			t.Fatalf("denied call changed the buckets: requests %v→%v tokens %v→%v", requestsBefore, r, tokensBefore, tk)
		}
		// Under concurrency: 40 calls of 100 tokens for 250 tokens left
		// (each uses all of its estimate): exactly 2 pass, and exactly 2
		// requests are charged.
		var allowed atomic.Int64
		var wg sync.WaitGroup
		for range 40 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := f.ask.CallUnary(context.Background(), f.request("use=100", 100))
				switch {
				case err == nil:
					allowed.Add(1)
				case connect.CodeOf(err) != connect.CodeResourceExhausted:
					t.Errorf("unexpected error %v", err)
				}
			}()
		}
		wg.Wait()
		r, tk := f.levels(t, "ip:127.0.0.1")
		if allowed.Load() != 2 || !near(requestsBefore-r, 2) || !near(tokensBefore-tk, 200) {
			t.Fatalf("allowed %d, charged %v requests and %v tokens; want 2, 2, 200", allowed.Load(), requestsBefore-r, tokensBefore-tk)
		}
	})
}

func TestEstimateErrorIsInvalidArgument(t *testing.T) {
	t.Parallel()
	f := newAIFixture(t, aiConfig(), nil)
	_, err := f.ask.CallUnary(t.Context(), f.request("use=1", -5))
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeInvalidArgument || !containsAll(ce.Message(), "tokens", "request.max_tokens", "-5") {
		t.Fatalf("err = %v, want invalid_argument naming the bucket, expression and value", err)
	}
	if r, tk := f.levels(t, "ip:127.0.0.1"); r != 1000 || tk != 1000 {
		t.Fatalf("a call that could not be priced was charged: %v %v", r, tk)
	}
}

func TestReportUsageErrors(t *testing.T) {
	t.Parallel()
	if err := interceptor.ReportUsage(t.Context(), "tokens", 1); err == nil {
		t.Fatal("ReportUsage outside a call succeeded")
	}
}

func TestWarningHeader(t *testing.T) {
	t.Parallel()
	f := newAIFixture(t, aiConfig(), nil, interceptor.WithWarnFraction(0.5))
	res, err := f.ask.CallUnary(t.Context(), f.request("use=400", 400))
	if err != nil {
		t.Fatal(err)
	}
	if h := res.Header().Get(interceptor.HeaderWarning); h != "" {
		t.Fatalf("warning %q with 600 of 1000 tokens left", h)
	}
	res, err = f.ask.CallUnary(t.Context(), f.request("use=200", 200))
	if err != nil {
		t.Fatal(err)
	}
	if h, want := res.Header().Get(interceptor.HeaderWarning), `"tokens";r=400;q=1000`; h != want {
		t.Fatalf("warning = %q, want %q", h, want)
	}
}

func TestGetQuota(t *testing.T) {
	t.Parallel()
	cfg := aiConfig()
	cfg.Buckets["tokens"] = costmapBucket{Capacity: 1000, RefillPerSecond: 2}
	f := newAIFixture(t, cfg, nil)
	if _, err := f.ask.CallUnary(t.Context(), f.request("use=990", 990)); err != nil {
		t.Fatal(err)
	}
	ask := func(cost *float64, buckets ...string) *connectlimitv1.GetQuotaResponse {
		t.Helper()
		req := connectRequest(&connectlimitv1.GetQuotaRequest{Cost: cost, Buckets: buckets})
		res, err := f.quota.GetQuota(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		return res.Msg
	}
	for range 2 { // reading twice shows nothing is charged
		q := ask(float64p(20))
		if q.GetSubject() != "ip:127.0.0.1" || q.GetTier() != "anonymous" || len(q.GetBuckets()) != 2 {
			t.Fatalf("GetQuota = %v", q)
		}
		tok := q.GetBuckets()[1]
		if tok.GetName() != "tokens" || tok.GetCapacity() != 1000 || !near(tok.GetRemaining(), 10) {
			t.Fatalf("tokens = %v", tok)
		}
		// 10 more tokens at 2/s; the fake clock stands still.
		if got := tok.GetRetryAfter().AsDuration(); got != 5*time.Second {
			t.Fatalf("retry_after = %v, want 5s", got)
		}
		if req := q.GetBuckets()[0]; req.GetRetryAfter().AsDuration() != 0 {
			t.Fatalf("requests retry_after = %v, want 0", req.GetRetryAfter().AsDuration())
		}
		if c := q.GetConcurrency(); len(c) != 1 || c[0].GetName() != "streams" || c[0].GetLimit() != 2 {
			t.Fatalf("concurrency = %v", c)
		}
	}
	if q := ask(float64p(5000), "tokens"); len(q.GetBuckets()) != 1 || q.GetBuckets()[0].GetRetryAfter() != nil {
		t.Fatalf("a cost over capacity got retry_after %v", q.GetBuckets()[0].GetRetryAfter())
	}
	if q := ask(nil); q.GetBuckets()[1].GetRetryAfter() != nil {
		t.Fatal("retry_after set without a cost")
	}
	for _, bad := range []*connectlimitv1.GetQuotaRequest{{Buckets: []string{"nope"}}, {Cost: float64p(-1)}} {
		if _, err := f.quota.GetQuota(t.Context(), connectRequest(bad)); connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Fatalf("GetQuota(%v) = %v, want invalid_argument", bad, err)
		}
	}
	// A pro caller sees the pro tier's limits.
	req := connectRequest(&connectlimitv1.GetQuotaRequest{})
	req.Header().Set("X-Test-Identity", "pro:zoe")
	res, err := f.quota.GetQuota(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	if q := res.Msg; q.GetTier() != "pro" || q.GetBuckets()[1].GetCapacity() != 10000 || q.GetConcurrency()[0].GetLimit() != 3 {
		t.Fatalf("pro quota = %v", q)
	}
	req.Header().Set("X-Test-Identity", "gold:zoe")
	if _, err := f.quota.GetQuota(t.Context(), req); connect.CodeOf(err) != connect.CodeInternal {
		t.Fatalf("undeclared tier: %v, want internal", err)
	}
}

func float64p(f float64) *float64 { return &f }

func connectRequest[T any](m *T) *connect.Request[T] { return connect.NewRequest(m) }

func containsAll(s string, parts ...string) bool {
	for _, p := range parts {
		if !contains(s, p) {
			return false
		}
	}
	return true
}
