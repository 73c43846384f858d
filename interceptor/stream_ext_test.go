package interceptor_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// drain reads a Report stream to its end and returns the tokens received.
func drain(t *testing.T, f *aiFixture, ctx context.Context, topic string, estimate int32) (int, http_Header, error) {
	t.Helper()
	stream, err := f.report.CallServerStream(ctx, f.request(topic, estimate))
	if err != nil {
		return 0, nil, err
	}
	got := 0
	for stream.Receive() {
		m := stream.Msg()
		got += int(m.Get(m.Descriptor().Fields().ByName("tokens")).Int())
	}
	return got, stream.ResponseHeader(), stream.Err()
}

// eventually polls cond, for effects that land after the client saw the
// call end (a server settles after its last message), for at most 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestStreamReserveAndSettle(t *testing.T) {
	t.Parallel()
	stores(t, func(t *testing.T, store bucket.Store) {
		for _, tc := range []struct {
			name       string
			topic      string
			estimate   int32
			cancelAt   int // cancel the call after this many tokens; 0: never
			wantTokens int // received
			wantCode   connect.Code
			wantUsed   float64
		}{
			{"normal end refunds the unused reservation", "use=20", 100, 0, 20, 0, 20},
			{"overrun within the bucket is charged as it happens", "use=150", 100, 0, 150, 0, 150},
			{"handler error settles to what was sent", "fail-after=2", 100, 0, 8, connect.CodeInternal, 8},
			{"client cancel settles to what was sent", "wait", 100, 4, 4, connect.CodeCanceled, 4},
		} {
			t.Run(tc.name, func(t *testing.T) {
				f := newAIFixture(t, aiConfig(), store)
				subject := "user:" + t.Name() // the Redis is shared by the cases
				ctx, cancel := context.WithCancel(t.Context())
				defer cancel()
				req := f.request(tc.topic, tc.estimate)
				req.Header().Set("X-Test-Identity", ":"+t.Name())
				stream, err := f.report.CallServerStream(ctx, req)
				if err != nil {
					t.Fatal(err)
				}
				got := 0
				for stream.Receive() {
					m := stream.Msg()
					got += int(m.Get(m.Descriptor().Fields().ByName("tokens")).Int())
					if tc.cancelAt > 0 && got >= tc.cancelAt {
						// While the stream is open, the reservation shows.
						if _, tokens := f.levels(t, subject); !near(1000-tokens, float64(tc.estimate)) {
							t.Errorf("during the stream %v tokens are reserved, want %d", 1000-tokens, tc.estimate)
						}
						cancel()
					}
				}
				if got != tc.wantTokens || connect.CodeOf(stream.Err()) != tc.wantCode && !(tc.wantCode == 0 && stream.Err() == nil) {
					t.Fatalf("received %d tokens, err %v; want %d, %v", got, stream.Err(), tc.wantTokens, tc.wantCode)
				}
				if h := stream.ResponseHeader().Get("RateLimit"); h == "" {
					t.Error("stream has no RateLimit header")
				}
				eventually(t, "the stream settles", func() bool {
					requests, tokens := f.levels(t, subject)
					return near(1000-tokens, tc.wantUsed) && near(1000-requests, 1)
				})
			})
		}
	})
}

func TestStreamCutWhenBucketCannotPay(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name         string
		overdraft    float64
		wantReceived int
		wantDebt     float64
	}{
		// 30 tokens, 10 reserved: chunks of 4 are paid for up to 28 tokens
		// (7 chunks); the 8th (32) cannot be paid: it is delivered, then
		// the stream ends and the bucket owes 2.
		{"no overdraft", 0, 32, -2},
		// An overdraft of 6 lets the stream run until it owes more than 6.
		{"overdraft", 6, 36, -6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := aiConfig()
			cfg.Buckets["tokens"] = bucketConfig(30)
			f := newAIFixture(t, cfg, nil, interceptor.WithStreamOverdraft(tc.overdraft))
			got, _, err := drain(t, f, t.Context(), "use=400", 10)
			ce := new(connect.Error)
			if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
				t.Fatalf("err = %v, want resource_exhausted", err)
			}
			if got != tc.wantReceived {
				t.Fatalf("received %d tokens before the cut, want %d", got, tc.wantReceived)
			}
			var retry *errdetails.RetryInfo
			for _, d := range ce.Details() {
				if v, _ := d.Value(); v != nil {
					if ri, ok := v.(*errdetails.RetryInfo); ok {
						retry = ri
					}
				}
			}
			if retry == nil {
				t.Fatal("cut stream has no RetryInfo")
			}
			eventually(t, "the stream settles into debt", func() bool {
				_, tokens := f.levels(t, "ip:127.0.0.1")
				return near(tokens, tc.wantDebt)
			})
			// In debt, the next stream is denied up front.
			if _, _, err := drain(t, f, t.Context(), "use=4", 1); connect.CodeOf(err) != connect.CodeResourceExhausted {
				t.Fatalf("stream while in debt: %v", err)
			}
		})
	}
}

func TestConcurrencyLimit(t *testing.T) {
	t.Parallel()
	f := newAIFixture(t, aiConfig(), nil)
	open := func(ctx context.Context) (*connect.ServerStreamForClient[msg], error) {
		stream, err := f.report.CallServerStream(ctx, f.request("wait", 1))
		if err != nil {
			return nil, err
		}
		if !stream.Receive() {
			return nil, stream.Err()
		}
		return stream, nil
	}
	ctx1, cancel1 := context.WithCancel(t.Context())
	defer cancel1()
	for range 2 {
		if _, err := open(ctx1); err != nil {
			t.Fatal(err)
		}
	}
	_, err := open(t.Context())
	ce := new(connect.Error)
	if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted || !contains(ce.Message(), `"streams"`) {
		t.Fatalf("third stream: %v, want resource_exhausted naming the limit", err)
	}
	found := false
	for _, d := range ce.Details() {
		if v, _ := d.Value(); v != nil {
			if qf, ok := v.(*errdetails.QuotaFailure); ok && qf.GetViolations()[0].GetQuotaId() == "streams" {
				found = true
			}
		}
	}
	if !found {
		t.Fatal("no QuotaFailure naming the concurrency limit")
	}
	// Another identity has its own slots.
	req := f.request("use=4", 4)
	req.Header().Set("X-Test-Identity", ":someone-else")
	if s, err := f.report.CallServerStream(t.Context(), req); err != nil || !s.Receive() {
		t.Fatalf("another identity was limited: %v", err)
	}
	// Ending the two streams frees their slots.
	cancel1()
	eventually(t, "the slots are released", func() bool {
		s, err := open(t.Context())
		if err != nil {
			return false
		}
		_ = s.Close()
		return true
	})
}

// TestConcurrencyAcrossInstances shares one Redis between two interceptors:
// the limit holds across them, and the slots of an instance that died
// without releasing them come back once its leases expire.
func TestConcurrencyAcrossInstances(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	a := newAIFixture(t, aiConfig(), redisStore(t, rs))
	b := newAIFixture(t, aiConfig(), redisStore(t, rs))
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	for _, f := range []*aiFixture{a, b} {
		s, err := f.report.CallServerStream(ctx, f.request("wait", 1))
		if err != nil || !s.Receive() {
			t.Fatalf("opening a stream: %v %v", err, s.Err())
		}
	}
	s, err := a.report.CallServerStream(t.Context(), a.request("wait", 1))
	if err == nil && s.Receive() {
		t.Fatal("a third stream across two instances was allowed")
	}
	cancel()
	// A "crashed" instance: it takes both slots and never renews or
	// releases them. Its leases last 1 s (the configured lease).
	crashed := redisStore(t, rs)
	eventually(t, "the streams' slots are released", func() bool {
		n := 0
		for i := range 2 {
			d, err := crashed.Acquire(t.Context(), bucket.LeaseRequest{Subject: "ip:127.0.0.1", Name: "streams", Limit: 2, ID: "crashed-" + string(rune('a'+i)), TTL: time.Second})
			if err == nil && d.Acquired {
				n++
			}
		}
		return n == 2
	})
	if _, _, err := drain(t, b, t.Context(), "use=4", 4); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("with a dead instance holding both slots: %v, want resource_exhausted", err)
	}
	start := time.Now()
	eventually(t, "the dead instance's leases expire", func() bool {
		_, _, err := drain(t, b, t.Context(), "use=4", 4)
		return err == nil
	})
	if waited := time.Since(start); waited > 5*time.Second {
		t.Fatalf("slots came back after %v, want about the 1 s lease", waited)
	}
	_ = redisstore.DefaultKeyPrefix
}

func TestBidiChargesEachMessage(t *testing.T) {
	t.Parallel()
	cfg := aiConfig()
	cfg.Buckets["tokens"] = bucketConfig(10)
	f := newAIFixture(t, cfg, nil)
	stream := f.chat.CallBidiStream(t.Context())
	var sent atomic.Int64
	for _, topic := range []string{"four", "four", "fourty"} {
		if err := stream.Send(prototestReq(f, topic)); err != nil {
			break
		}
		sent.Add(1)
	}
	_ = stream.CloseRequest()
	replies := 0
	for {
		if _, err := stream.Receive(); err != nil {
			if connect.CodeOf(err) != connect.CodeResourceExhausted {
				t.Fatalf("err = %v, want resource_exhausted for the third message", err)
			}
			break
		}
		replies++
	}
	if replies != 2 {
		t.Fatalf("%d replies, want 2 (the third message costs 6 with 2 left)", replies)
	}
	if _, tokens := f.levels(t, "ip:127.0.0.1"); !near(tokens, 2) {
		t.Fatalf("tokens = %v, want 2", tokens)
	}
}
