package interceptor_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
)

// brokenStore fails every call, with a message clients must never see.
type brokenStore struct{}

func (brokenStore) Take(context.Context, bucket.Request) (bucket.Decision, error) {
	return bucket.Decision{}, errors.New("dial tcp 10.0.0.9:7001: secret backend detail")
}

// hungStore never answers before the context ends, like a Redis that
// stopped responding.
type hungStore struct{}

func (hungStore) Take(ctx context.Context, _ bucket.Request) (bucket.Decision, error) {
	<-ctx.Done()
	return bucket.Decision{}, ctx.Err()
}

// syncBuffer is a log sink safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
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

func TestStoreFailurePolicy(t *testing.T) {
	t.Parallel()
	const timeout = 50 * time.Millisecond
	for _, tc := range []struct {
		name     string
		store    bucket.Store
		policy   interceptor.FailurePolicy
		wantCode connect.Code // 0: the call succeeds
		wantLog  string
	}{
		{"broken store fails open", brokenStore{}, interceptor.FailOpen, 0, "secret backend detail"},
		{"broken store fails closed", brokenStore{}, interceptor.FailClosed, connect.CodeUnavailable, "secret backend detail"},
		{"hung store fails open after the timeout", hungStore{}, interceptor.FailOpen, 0, "charge=unknown"},
		{"hung store fails closed after the timeout", hungStore{}, interceptor.FailClosed, connect.CodeUnavailable, "deadline exceeded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var logs syncBuffer
			f := newFixture(t, tc.store,
				interceptor.WithFailurePolicy(tc.policy),
				interceptor.WithStoreTimeout(timeout),
				interceptor.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
			for _, call := range []func() error{
				func() error { _, err := callSearch(t, f.search, ""); return err },
				func() error {
					s, err := f.generate.CallServerStream(t.Context(), connect.NewRequest(wrapperspb.String("x")))
					if err != nil {
						return err
					}
					for s.Receive() { //nolint:revive // draining
					}
					return s.Err()
				},
			} {
				start := time.Now()
				err := call()
				if elapsed := time.Since(start); elapsed > timeout+5*time.Second {
					t.Fatalf("call took %v with a %v store timeout", elapsed, timeout)
				}
				if tc.wantCode == 0 {
					if err != nil {
						t.Fatalf("fail-open call failed: %v", err)
					}
					continue
				}
				if connect.CodeOf(err) != tc.wantCode {
					t.Fatalf("err = %v, want %v", err, tc.wantCode)
				}
				if strings.Contains(err.Error(), "secret") || strings.Contains(err.Error(), "7001") {
					t.Fatalf("backend detail leaked to the client: %v", err)
				}
				var ce *connect.Error
				if errors.As(err, &ce) && ce.Code() == connect.CodeResourceExhausted {
					t.Fatal("store failure reported as a quota denial")
				}
			}
			if !strings.Contains(logs.String(), tc.wantLog) {
				t.Errorf("log %q does not mention %q", logs.String(), tc.wantLog)
			}
		})
	}
}

func TestNewInterceptorErrors(t *testing.T) {
	t.Parallel()
	costs, err := costmap.New(testConfig())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		store  bucket.Store
		costs  *costmap.Map
		opts   []interceptor.Option
		wantIn string
	}{
		{"nil store", nil, costs, nil, "store"},
		{"nil costs", brokenStore{}, nil, nil, "cost map"},
		{"zero timeout", brokenStore{}, costs, []interceptor.Option{interceptor.WithStoreTimeout(0)}, "timeout"},
		{"negative timeout", brokenStore{}, costs, []interceptor.Option{interceptor.WithStoreTimeout(-time.Second)}, "-1s"},
		{"bad policy", brokenStore{}, costs, []interceptor.Option{interceptor.WithFailurePolicy(9)}, "FailurePolicy(9)"},
		{"nil identity func", brokenStore{}, costs, []interceptor.Option{interceptor.WithIdentityFunc(nil)}, "WithIdentityFunc"},
		{"nil logger", brokenStore{}, costs, []interceptor.Option{interceptor.WithLogger(nil)}, "WithLogger"},
		{"invalid proxy prefix", brokenStore{}, costs, []interceptor.Option{interceptor.WithTrustedProxies(netip.Prefix{})}, "proxy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := interceptor.NewInterceptor(tc.store, tc.costs, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.wantIn)
			}
		})
	}
}

func TestDenialErrorOverCapacity(t *testing.T) {
	t.Parallel()
	lim := bucket.Limit{Capacity: 100, RefillPerSecond: 1}
	d := bucket.Decide(bucket.Request{Subject: "user:a", Charges: []bucket.Charge{
		{Bucket: "tokens", Limit: lim, Cost: 150},
		{Bucket: "requests", Limit: lim, Cost: 1},
	}}, []float64{100, 100})
	err := interceptor.DenialError("user:a", d)
	if err.Code() != connect.CodeResourceExhausted {
		t.Fatalf("code = %v", err.Code())
	}
	if msg := err.Message(); !strings.Contains(msg, "150") || !strings.Contains(msg, `"tokens"`) || !strings.Contains(msg, "never") {
		t.Errorf("message %q does not explain the cost can never be paid", msg)
	}
	if got := err.Meta().Get("Retry-After"); got != "" {
		t.Errorf("Retry-After = %q on a denial no wait can cure", got)
	}
	for _, detail := range err.Details() {
		v, derr := detail.Value()
		if derr != nil {
			t.Fatal(derr)
		}
		switch v := v.(type) {
		case *errdetails.RetryInfo:
			t.Errorf("RetryInfo %v on a denial no wait can cure", v)
		case *errdetails.QuotaFailure:
			if len(v.GetViolations()) != 1 || v.GetViolations()[0].GetQuotaId() != "tokens" {
				t.Errorf("QuotaFailure = %v, want one violation for tokens", v)
			}
		}
	}
}

func TestRetryAfterRoundsUp(t *testing.T) {
	t.Parallel()
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	for _, tc := range []struct {
		have float64
		want string
	}{
		{9.999, "1"},
		{9, "1"},
		{8.5, "2"},
		{0, "10"},
	} {
		d := bucket.Decide(bucket.Request{Subject: "s", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 10}}}, []float64{tc.have})
		if got := interceptor.DenialError("s", d).Meta().Get("Retry-After"); got != tc.want {
			t.Errorf("have %v of 10: Retry-After = %q, want %q", tc.have, got, tc.want)
		}
	}
}
