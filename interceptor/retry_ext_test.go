package interceptor_test

import (
	"sync"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/interceptor"
)

// TestSettleRetriedAfterOutage breaks Redis while calls run, so that their
// settlements cannot reach it: they are retried in the background, and once
// Redis answers, what it holds is exactly what the calls used, whether the
// settlement never reached Redis or reached it and lost its reply.
func TestSettleRetriedAfterOutage(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		inject  func(t *testing.T, f *faultFixture)
		recover func(t *testing.T, f *faultFixture)
	}{
		{"never reached Redis",
			func(t *testing.T, f *faultFixture) { f.refuseConnections(t) },
			func(t *testing.T, f *faultFixture) { must(t, f.proxy.Enable()) }},
		{"applied, reply lost",
			func(t *testing.T, f *faultFixture) { must(t, f.proxy.DropReplies()) },
			func(_ *testing.T, f *faultFixture) { f.proxy.Clear() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFaultFixtureTimeout(t, aiConfig(), interceptor.FailClosed, 2*time.Second)
			done := make(chan error, 1)
			go func() {
				_, err := f.ask.CallUnary(t.Context(), f.request("gate,use=30", 100))
				done <- err
			}()
			// The call reserved; break Redis before it settles.
			eventually(t, "the call reserved", func() bool { return f.arrivals("").Load() == 1 })
			tc.inject(t, f)
			f.gate <- struct{}{}
			if err := <-done; err != nil {
				t.Fatalf("call: %v", err)
			}
			if s := f.ic.Stats(); s.SettlesRetried == 0 {
				t.Fatalf("stats %+v: the settlement was not queued for a retry", s)
			}
			tc.recover(t, f)
			eventually(t, "Redis holds what the call used", func() bool {
				requests, tokens := f.charged(t, "ip:127.0.0.1")
				return near(requests, 1) && near(tokens, 30)
			})
			if s := f.ic.Stats(); s.SettlesDropped != 0 {
				t.Fatalf("stats %+v: a settlement was dropped", s)
			}
		})
	}
}

// TestSettleDroppedWhenRetriesRunOut keeps Redis away longer than the
// settle retry duration: the settlement is dropped and counted, and the
// call keeps what it reserved.
func TestSettleDroppedWhenRetriesRunOut(t *testing.T) {
	t.Parallel()
	f := newFaultFixtureTimeout(t, aiConfig(), interceptor.FailClosed, 2*time.Second, interceptor.WithSettleQueue(4, 300*time.Millisecond))
	done := make(chan error, 1)
	go func() {
		_, err := f.ask.CallUnary(t.Context(), f.request("gate,use=30", 100))
		done <- err
	}()
	eventually(t, "the call reserved", func() bool { return f.arrivals("").Load() == 1 })
	f.proxy.Disable()
	f.gate <- struct{}{}
	if err := <-done; err != nil {
		t.Fatalf("call: %v", err)
	}
	eventually(t, "the settlement is dropped", func() bool { return f.ic.Stats().SettlesDropped == 1 })
	must(t, f.proxy.Enable())
	time.Sleep(500 * time.Millisecond) // nothing may arrive late
	if requests, tokens := f.charged(t, "ip:127.0.0.1"); !near(requests, 1) || !near(tokens, 100) {
		t.Fatalf("charged %v requests and %v tokens, want the reservation kept: 1 and 100", requests, tokens)
	}
}

// TestSettleQueueBounds fills a small settle queue while Redis is down:
// settlements of one caller are merged into one entry, the callers that do
// not fit are dropped and counted, and one entry that keeps failing does
// not hold up the others.
func TestSettleQueueBounds(t *testing.T) {
	t.Parallel()
	f := newFaultFixtureTimeout(t, aiConfig(), interceptor.FailClosed, 2*time.Second, interceptor.WithSettleQueue(2, time.Minute))
	// Each call waits at its gate after reserving: u0 twice and u1 settle
	// first, then u2 and u3.
	calls := []struct{ user, gate string }{{"u0", "first"}, {"u0", "first"}, {"u1", "first"}, {"u2", "then"}, {"u3", "then"}}
	var wg sync.WaitGroup
	for _, c := range calls {
		wg.Go(func() {
			req := f.request("gate="+c.gate+",use=30", 100)
			req.Header().Set("X-Test-Identity", ":"+c.user)
			if _, err := f.ask.CallUnary(t.Context(), req); err != nil {
				t.Errorf("%s: %v", c.user, err)
			}
		})
	}
	eventually(t, "every call reserved and reached its gate", func() bool {
		return f.arrivals("first").Load() == 3 && f.arrivals("then").Load() == 2
	})
	// u1's settlement will keep failing: its bucket's field no longer
	// holds a bucket (cl:{g/65128} is user:u1's group hash, with the default
	// prefix and number of groups).
	rc := f.redis.NewClient(t)
	must(t, rc.HSet(t.Context(), "cl:{g/65128}", "user:u1/tokens", "not a bucket").Err())
	f.refuseConnections(t)
	close(f.namedGate("first"))
	eventually(t, "u0 and u1 settle into the queue", func() bool {
		s := f.ic.Stats()
		if s.SettlesRetried > 3 || s.SettlesDropped > 0 {
			t.Fatalf("stats %+v: want 3 settlements queued", s)
		}
		return s.SettlesRetried == 3
	})
	close(f.namedGate("then"))
	wg.Wait()
	// Two entries fit: u0 (both calls, merged) and u1; u2 and u3 are
	// dropped.
	if s := f.ic.Stats(); s.SettlesDropped != 2 || s.SettlesRetried != 3 {
		t.Fatalf("stats %+v: want 3 settlements queued (two of one caller) and 2 dropped", s)
	}
	must(t, f.proxy.Enable())
	eventually(t, "u0's two settlements are applied while u1's keeps failing", func() bool {
		_, tokens := f.charged(t, "user:u0")
		return near(tokens, 60)
	})
}

// refuseConnections makes the proxy refuse connections, and waits until the
// store's pooled connections are gone too, so that the next requests
// certainly do not reach Redis (a request written on a connection the proxy
// is closing has an unknown outcome).
func (f *faultFixture) refuseConnections(t *testing.T) {
	t.Helper()
	f.proxy.Disable()
	probe := bucket.Request{Subject: "probe", Charges: []bucket.Charge{{Bucket: "probe", Limit: bucket.Limit{Capacity: 1, RefillPerSecond: 1}}}}
	// Each request on a connection the proxy closed fails and retires
	// it; once the pool is empty of them, new connections are refused.
	refused := 0
	for range 100 {
		if _, err := f.store.Take(t.Context(), probe); err != nil && !bucket.MayHaveApplied(err) {
			if refused++; refused == 25 {
				return
			}
		} else {
			refused = 0
		}
	}
	t.Fatal("the store still reaches Redis after the proxy stopped")
}
