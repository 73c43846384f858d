package interceptor_test

import (
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/faultproxy"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// faultTimeout is the store timeout of the fault tests: the default.
const faultTimeout = interceptor.DefaultStoreTimeout

// faultFixture is the AI test service over a real redis-server reached
// through a fault-injecting proxy, with a local store for FailLocal.
type faultFixture struct {
	*aiFixture
	redis *redistest.Server
	proxy *faultproxy.Proxy
	// direct reads Redis without going through the proxy.
	direct *redisstore.Store
}

func newFaultFixture(t testing.TB, cfg costmap.Config, policy interceptor.FailurePolicy, opts ...interceptor.Option) *faultFixture {
	t.Helper()
	return newFaultFixtureTimeout(t, cfg, policy, faultTimeout, opts...)
}

// newFaultFixtureTimeout is newFaultFixture with a store timeout of the
// caller's: tests that are not about timeouts give a loaded test machine
// more time.
func newFaultFixtureTimeout(t testing.TB, cfg costmap.Config, policy interceptor.FailurePolicy, timeout time.Duration, opts ...interceptor.Option) *faultFixture {
	t.Helper()
	rs := redistest.Start(t)
	px := faultproxy.NewProxy(t, rs.Addr())
	// As server.WithRedisURL configures its client.
	client := redis.NewClient(&redis.Options{
		Addr: px.Addr(), ContextTimeoutEnabled: true, MaxRetries: -1, DialerRetries: 1, MinIdleConns: 2, DialTimeout: time.Second,
	})
	t.Cleanup(func() { _ = client.Close() })
	store := redisstore.New(client, redisstore.WithTimeout(timeout))
	local := memstore.New()
	t.Cleanup(func() { _ = local.Close() })
	opts = append([]interceptor.Option{
		interceptor.WithFailurePolicy(policy),
		interceptor.WithStoreTimeout(timeout),
		interceptor.WithLocalStore(local),
	}, opts...)
	f := newAIFixture(t, cfg, store, opts...)
	return &faultFixture{aiFixture: f, redis: rs, proxy: px, direct: redisstore.New(rs.NewClient(t), redisstore.WithTimeout(10*time.Second))}
}

// charged returns what Redis holds as charged to subject: capacity minus
// level, for requests and tokens.
func (f *faultFixture) charged(t *testing.T, subject string) (requests, tokens float64) {
	t.Helper()
	d, err := f.direct.Take(t.Context(), bucket.Request{Subject: subject, Charges: []bucket.Charge{
		{Bucket: "requests", Limit: mustLimit(t, f.cfg.Buckets["requests"])},
		{Bucket: "tokens", Limit: mustLimit(t, f.cfg.Buckets["tokens"])},
	}})
	if err != nil {
		t.Fatalf("reading Redis directly: %v", err)
	}
	return d.Buckets[0].Limit.Capacity - d.Buckets[0].Remaining, d.Buckets[1].Limit.Capacity - d.Buckets[1].Remaining
}

// fault is a way for the store to fail, and how it recovers.
type fault struct {
	name    string
	inject  func(t *testing.T, f *faultFixture)
	recover func(t *testing.T, f *faultFixture)
	// wipes says that recovering loses what Redis held (a restart of a
	// server that persists nothing).
	wipes bool
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

var faults = []fault{
	{name: "latency above the timeout",
		inject:  func(t *testing.T, f *faultFixture) { must(t, f.proxy.Latency(5*faultTimeout)) },
		recover: func(_ *testing.T, f *faultFixture) { f.proxy.Clear() }},
	{name: "blackhole",
		inject:  func(t *testing.T, f *faultFixture) { must(t, f.proxy.Blackhole()) },
		recover: func(_ *testing.T, f *faultFixture) { f.proxy.Clear() }},
	{name: "connection resets",
		inject:  func(t *testing.T, f *faultFixture) { must(t, f.proxy.ResetPeer()) },
		recover: func(_ *testing.T, f *faultFixture) { f.proxy.Clear() }},
	{name: "replies lost after Redis applied the request",
		inject:  func(t *testing.T, f *faultFixture) { must(t, f.proxy.DropReplies()) },
		recover: func(_ *testing.T, f *faultFixture) { f.proxy.Clear() }},
	{name: "connections refused",
		inject:  func(_ *testing.T, f *faultFixture) { f.proxy.Disable() },
		recover: func(t *testing.T, f *faultFixture) { must(t, f.proxy.Enable()) }},
	{name: "SIGSTOP",
		inject:  func(t *testing.T, f *faultFixture) { must(t, f.redis.Pause(0)) },
		recover: func(t *testing.T, f *faultFixture) { must(t, f.redis.Resume()) }},
	{name: "kill -9 and restart",
		inject:  func(t *testing.T, f *faultFixture) { must(t, f.redis.Kill()) },
		recover: func(t *testing.T, f *faultFixture) { must(t, f.redis.Restart()) },
		wipes:   true},
}

// TestStoreFaults breaks a real Redis in every way the tests can, under
// every failure policy. While it is broken, every call is answered within
// the timeout budget with the policy's answer (never a quota denial from a
// store that did not decide, never a hang); once the circuit breaker has
// opened, calls are answered without trying the store; after recovery,
// exact limiting is back within 5 s, and what the calls cost (post-paid) is
// what Redis holds. How fast calls are answered while the breaker is open
// is measured by BenchmarkStoreDown, not here: this machine is shared.
func TestStoreFaults(t *testing.T) {
	t.Parallel()
	// Before the breaker opens, a unary call may wait for a reservation,
	// its resend and its settlement to time out. The slack is for a
	// loaded test machine; a hang would take seconds more.
	const budget = 3*faultTimeout + 2*time.Second
	for _, fl := range faults {
		for _, policy := range []interceptor.FailurePolicy{interceptor.FailLocal, interceptor.FailOpen, interceptor.FailClosed} {
			t.Run(fl.name+"/"+policy.String(), func(t *testing.T) {
				t.Parallel()
				f := newFaultFixture(t, aiConfig(), policy)
				const subject = "ip:127.0.0.1"
				ask := func() (time.Duration, error) {
					start := time.Now()
					_, err := f.ask.CallUnary(t.Context(), f.request("use=3", 3))
					return time.Since(start), err
				}
				if _, err := ask(); err != nil {
					t.Fatalf("with Redis up: %v", err)
				}
				ran := 1 // calls that reached the handler, each using 3 tokens
				ranBeforeFault := ran
				fl.inject(t, f)
				var slowest time.Duration
				for i := 0; f.ic.Stats().BreakerOpens == 0; i++ {
					if i == 20 {
						t.Fatalf("the breaker did not open after %d calls; stats %+v", i, f.ic.Stats())
					}
					took, err := ask()
					slowest = max(slowest, took)
					if took > budget {
						t.Fatalf("call %d took %v, over the budget %v", i, took, budget)
					}
					if checkPolicyAnswer(t, policy, err) {
						ran++
					}
				}
				// Breaker open: the store is not tried.
				before := f.ic.Stats()
				for range 50 {
					took, err := ask()
					slowest = max(slowest, took)
					if checkPolicyAnswer(t, policy, err) {
						ran++
					}
				}
				after := f.ic.Stats()
				// A store call or two in flight when it opened may still
				// fail meanwhile; every other one is refused.
				refused, failed := after.BreakerRejected-before.BreakerRejected, after.StoreFailures-before.StoreFailures
				if refused < 50 || failed-refused > 2 {
					t.Errorf("with the breaker open, %d store calls failed and the breaker refused %d of them: some tried the store", failed, refused)
				}
				t.Logf("slowest call during the outage: %v", slowest)
				recovered := time.Now()
				fl.recover(t, f)
				// Exact limiting is back when a call is decided by Redis.
				for {
					before := f.ic.Stats()
					_, err := ask()
					after := f.ic.Stats()
					if err == nil {
						ran++
					}
					if err == nil && after.StoreFailures == before.StoreFailures && after.BreakerCloses > 0 {
						break
					}
					if time.Since(recovered) > 5*time.Second {
						t.Fatalf("no call decided by Redis within 5s of recovery; last error %v, stats %+v", err, after)
					}
					time.Sleep(10 * time.Millisecond)
				}
				t.Logf("exact limiting back %v after recovery; stats %+v", time.Since(recovered).Round(time.Millisecond), f.ic.Stats())
				// Every call that ran is billed exactly once: 1 request
				// and 3 tokens each (rejected calls are refunded).
				want := ran
				if fl.wipes {
					want -= ranBeforeFault // what Redis held before the fault is gone
				}
				eventually(t, "what the calls cost is what Redis holds", func() bool {
					requests, tokens := f.charged(t, subject)
					return near(requests, float64(want)) && near(tokens, 3*float64(want))
				})
			})
		}
	}
}

// checkPolicyAnswer checks that err is what policy answers a call with
// while the store is down, and reports whether the call ran.
func checkPolicyAnswer(t *testing.T, policy interceptor.FailurePolicy, err error) bool {
	t.Helper()
	switch policy {
	case interceptor.FailClosed:
		if connect.CodeOf(err) != connect.CodeUnavailable {
			t.Fatalf("%v: err = %v, want unavailable", policy, err)
		}
		// Backend details stay in the logs.
		if msg := err.Error(); strings.Contains(msg, "127.0.0.1") || strings.Contains(msg, "redis") {
			t.Fatalf("%v: the error leaks backend details: %v", policy, err)
		}
		return false
	default:
		if err != nil {
			t.Fatalf("%v: err = %v, want the call allowed", policy, err)
		}
		return true
	}
}

// TestUnknownOutcomesAreExact loses the replies of requests Redis applied,
// for a reservation, a stream's excess and a lease: once Redis answers
// again, what it holds is exactly what the calls used, and no lease is left
// behind.
func TestUnknownOutcomesAreExact(t *testing.T) {
	t.Parallel()
	const subject = "ip:127.0.0.1"
	t.Run("reserve", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			policy      interceptor.FailurePolicy
			wantRan     bool
			wantTokens  float64
			wantRequest float64
		}{
			{interceptor.FailLocal, true, 30, 1},
			{interceptor.FailOpen, true, 30, 1},
			{interceptor.FailClosed, false, 0, 0},
		} {
			t.Run(tc.policy.String(), func(t *testing.T) {
				t.Parallel()
				f := newFaultFixtureTimeout(t, aiConfig(), tc.policy, time.Second)
				must(t, f.proxy.DropReplies())
				_, err := f.ask.CallUnary(t.Context(), f.request("use=30", 100))
				if ran := err == nil; ran != tc.wantRan {
					t.Fatalf("err = %v; want the call to run: %v", err, tc.wantRan)
				}
				if s := f.ic.Stats(); s.UnknownOutcomes == 0 {
					t.Fatalf("stats %+v: no unknown outcome counted", s)
				}
				// Redis applied the reservation (and the settlement); its
				// replies were lost. Once it answers, the resends with the
				// same IDs are duplicates or fill the gaps.
				f.proxy.Clear()
				eventually(t, "Redis holds what the call used", func() bool {
					requests, tokens := f.charged(t, subject)
					return near(requests, tc.wantRequest) && near(tokens, tc.wantTokens)
				})
			})
		}
	})
	t.Run("stream excess", func(t *testing.T) {
		t.Parallel()
		f := newFaultFixtureTimeout(t, aiConfig(), interceptor.FailOpen, time.Second)
		stream, err := f.report.CallServerStream(t.Context(), f.request("slow=150", 100))
		if err != nil {
			t.Fatal(err)
		}
		got, dropped := 0, false
		for stream.Receive() {
			m := stream.Msg()
			got += int(m.Get(m.Descriptor().Fields().ByName("tokens")).Int())
			if got >= 100 && !dropped {
				// From here on every message's excess is taken from
				// Redis, which applies it and loses the reply.
				must(t, f.proxy.DropReplies())
				dropped = true
			}
		}
		if err := stream.Err(); err != nil || got != 150 {
			t.Fatalf("stream: %d tokens, %v; want 150 and no error", got, err)
		}
		f.proxy.Clear()
		eventually(t, "Redis holds what the stream used", func() bool {
			requests, tokens := f.charged(t, subject)
			return near(requests, 1) && near(tokens, 150)
		})
		if s := f.ic.Stats(); s.UnknownOutcomes == 0 {
			t.Fatalf("stats %+v: no unknown outcome counted", s)
		}
	})
	t.Run("lease", func(t *testing.T) {
		t.Parallel()
		cfg := aiConfig()
		cfg.Concurrency = map[string]costmap.ConcurrencyConfig{"streams": {Limit: 1, Lease: time.Minute}}
		cfg.Tiers = nil
		f := newFaultFixtureTimeout(t, cfg, interceptor.FailOpen, time.Second)
		must(t, f.proxy.DropReplies())
		if _, _, err := drain(t, f.aiFixture, t.Context(), "use=8", 10); err != nil {
			t.Fatalf("stream with the lease's reply lost: %v", err)
		}
		f.proxy.Clear()
		// The lease was acquired in Redis with its reply lost: it is
		// released in the background, not held for its whole minute.
		leases := f.redis.NewClient(t)
		eventually(t, "the possibly acquired lease is released", func() bool {
			n, err := leases.Exists(t.Context(), "cl:{"+subject+"}~lease:streams").Result()
			return err == nil && n == 0
		})
		if _, _, err := drain(t, f.aiFixture, t.Context(), "use=8", 10); err != nil {
			t.Fatalf("the only slot is still taken: %v", err)
		}
	})
}

// TestBidiSendAndReceiveConcurrently drives a bidi stream whose handler
// receives in one goroutine and sends from another while the client does
// the same, as Connect allows: under -race, nothing the interceptor shares
// between Receive and Send may race.
func TestBidiSendAndReceiveConcurrently(t *testing.T) {
	t.Parallel()
	stores(t, func(t *testing.T, store bucket.Store) {
		cfg := aiConfig()
		cfg.Buckets["tokens"] = bucketConfig(1e6)
		f := newAIFixture(t, cfg, store)
		stream := f.duplex.CallBidiStream(t.Context())
		const messages = 200
		var wg sync.WaitGroup
		sendErr := make(chan error, 1)
		wg.Go(func() {
			for i := range messages {
				if err := stream.Send(prototestReq(f, fmt.Sprint("message ", i))); err != nil {
					sendErr <- err
					return
				}
			}
			sendErr <- stream.CloseRequest()
		})
		received := 0
		for {
			if _, err := stream.Receive(); err != nil {
				break
			}
			received++
		}
		wg.Wait()
		if err := <-sendErr; err != nil {
			t.Fatalf("send: %v", err)
		}
		if err := stream.CloseResponse(); err != nil {
			t.Fatal(err)
		}
		if received != messages {
			t.Fatalf("received %d answers to %d messages", received, messages)
		}
	})
}

// TestConcurrencyOnlyProcedure checks that a procedure limited only by
// concurrency never asks the store to charge buckets: under FailClosed it
// works while the store is healthy.
func TestConcurrencyOnlyProcedure(t *testing.T) {
	t.Parallel()
	stores(t, func(t *testing.T, store bucket.Store) {
		cfg := aiConfig()
		cfg.Procedures = map[string]costmap.ProcedureConfig{reportProc: {Concurrency: "streams"}}
		f := newAIFixture(t, cfg, store, interceptor.WithFailurePolicy(interceptor.FailClosed))
		for range 3 {
			if _, _, err := drain(t, f, t.Context(), "use=8", 10); err != nil {
				t.Fatalf("concurrency-only stream: %v", err)
			}
		}
		if s := f.ic.Stats(); s.StoreFailures != 0 {
			t.Fatalf("stats %+v: a concurrency-only procedure made the store fail", s)
		}
		requests, tokens := f.levels(t, "ip:127.0.0.1")
		if requests != 1000 || tokens != 1000 {
			t.Fatalf("a concurrency-only procedure charged buckets: requests %v, tokens %v", requests, tokens)
		}
	})
}

// TestOutageOverAdmissionIsBounded kills the Redis two instances share:
// under FailLocal each keeps limiting in memory at its share of every
// limit, so one caller gets at most instances × share × limit during the
// outage, and under FailClosed nothing.
func TestOutageOverAdmissionIsBounded(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		policy      interceptor.FailurePolicy
		share       float64
		wantAllowed int
	}{
		{interceptor.FailLocal, 0.5, 100}, // 2 × 0.5 × 100 requests
		{interceptor.FailLocal, 0.25, 50}, // 2 × 0.25 × 100
		{interceptor.FailClosed, 0.5, 0},
	} {
		t.Run(fmt.Sprintf("%v/share %v", tc.policy, tc.share), func(t *testing.T) {
			t.Parallel()
			cfg := aiConfig()
			cfg.Buckets["requests"] = costmap.BucketConfig{Capacity: 100, RefillPerSecond: 1e-9}
			rs := redistest.Start(t)
			var instances []*aiFixture
			for range 2 {
				client := rs.NewClient(t, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries, o.DialerRetries = true, -1, 1 })
				store := redisstore.New(client, redisstore.WithTimeout(faultTimeout))
				instances = append(instances, newAIFixture(t, cfg, store,
					interceptor.WithFailurePolicy(tc.policy), interceptor.WithStoreTimeout(faultTimeout), interceptor.WithLocalShare(tc.share)))
			}
			must(t, rs.Kill())
			allowed := 0
			for i := range 400 {
				f := instances[i%2]
				switch _, err := f.ask.CallUnary(t.Context(), f.request("use=1", 1)); {
				case err == nil:
					allowed++
				case tc.policy == interceptor.FailLocal && connect.CodeOf(err) != connect.CodeResourceExhausted,
					tc.policy == interceptor.FailClosed && connect.CodeOf(err) != connect.CodeUnavailable:
					t.Fatalf("call %d: %v", i, err)
				}
			}
			t.Logf("%d of 400 calls allowed during the outage", allowed)
			if allowed != tc.wantAllowed {
				t.Fatalf("%d calls allowed during the outage, want instances × share × limit = %d", allowed, tc.wantAllowed)
			}
		})
	}
}

// TestFailureLogSaysWhetherChargeMayHaveApplied checks the log line of a
// store failure: charge=unknown exactly when the request may have been
// applied (its reply was lost), charge=none when it certainly was not (the
// connection was refused).
func TestFailureLogSaysWhetherChargeMayHaveApplied(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		inject     func(t *testing.T, f *faultFixture)
		wantCharge string
	}{
		{"reply lost", func(t *testing.T, f *faultFixture) { must(t, f.proxy.DropReplies()) }, "charge=unknown"},
		{"connection refused", func(t *testing.T, f *faultFixture) { f.refuseConnections(t) }, "charge=none"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var logs syncBuffer
			f := newFaultFixture(t, aiConfig(), interceptor.FailOpen,
				interceptor.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))), interceptor.WithLogInterval(0))
			tc.inject(t, f)
			if _, err := f.ask.CallUnary(t.Context(), f.request("use=1", 1)); err != nil {
				t.Fatal(err)
			}
			var line string
			for l := range strings.Lines(logs.String()) {
				if strings.Contains(l, "op=reserve") {
					line = l
					break
				}
			}
			if !strings.Contains(line, tc.wantCharge) {
				t.Fatalf("log line of the failed reservation %q does not say %s; log:\n%s", line, tc.wantCharge, logs.String())
			}
		})
	}
}

// syncBuffer is a log sink safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
