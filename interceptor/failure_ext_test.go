package interceptor_test

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
)

func TestNewInterceptorErrors(t *testing.T) {
	t.Parallel()
	costs, err := costmap.New(testConfig())
	if err != nil {
		t.Fatal(err)
	}
	withLocal := testConfig()
	withLocal.Procedures = map[string]costmap.ProcedureConfig{searchProc: {Bucket: "search", FailurePolicy: costmap.PolicyLocal}}
	localCosts, err := costmap.New(withLocal)
	if err != nil {
		t.Fatal(err)
	}
	mem := memstore.New()
	t.Cleanup(func() { _ = mem.Close() })
	// A store that can fail; these tests never call it.
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = client.Close() })
	remote := redisstore.New(client)
	closed := interceptor.WithFailurePolicy(interceptor.FailClosed)
	for _, tc := range []struct {
		name   string
		store  bucket.Store
		costs  *costmap.Map
		opts   []interceptor.Option
		wantIn string
	}{
		{"nil store", nil, costs, nil, "store"},
		{"nil costs", mem, nil, nil, "cost map"},
		{"zero timeout", mem, costs, []interceptor.Option{interceptor.WithStoreTimeout(0)}, "timeout"},
		{"timeout under 1ms", mem, costs, []interceptor.Option{interceptor.WithStoreTimeout(time.Nanosecond)}, "at least 1ms, got 1ns"},
		{"negative timeout", mem, costs, []interceptor.Option{interceptor.WithStoreTimeout(-time.Second)}, "-1s"},
		{"bad policy", mem, costs, []interceptor.Option{interceptor.WithFailurePolicy(9)}, "FailurePolicy(9)"},
		{"nil identity func", mem, costs, []interceptor.Option{interceptor.WithIdentityFunc(nil)}, "WithIdentityFunc"},
		{"nil logger", mem, costs, []interceptor.Option{interceptor.WithLogger(nil)}, "WithLogger"},
		{"invalid proxy prefix", mem, costs, []interceptor.Option{interceptor.WithTrustedProxies(netip.Prefix{})}, "proxy"},
		{"zero local share", mem, costs, []interceptor.Option{interceptor.WithLocalShare(0)}, "local share"},
		{"local share over 1", mem, costs, []interceptor.Option{interceptor.WithLocalShare(1.5)}, "1.5"},
		{"settle retry past the ID window", mem, costs, []interceptor.Option{interceptor.WithSettleQueue(8, time.Hour)}, "at most 59m0s"},
		{"overdraft past MaxTokens", mem, costs, []interceptor.Option{interceptor.WithStreamOverdraft(1e16)}, "overdraft"},
		{"local policy without a local store", remote, costs, nil, "WithLocalStore"},
		{"a procedure's local policy without a local store", remote, localCosts, []interceptor.Option{closed}, "WithLocalStore"},
		{"local store that can fail", remote, costs, []interceptor.Option{interceptor.WithLocalStore(remote)}, "in-process"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := interceptor.NewInterceptor(tc.store, tc.costs, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.wantIn)
			}
		})
	}
	// An in-process store never fails, so it needs no local store, and a
	// store that can fail needs none when no procedure fails locally.
	for _, store := range []bucket.Store{mem, remote} {
		opts := []interceptor.Option{}
		if store == remote {
			opts = append(opts, closed)
		}
		ic, err := interceptor.NewInterceptor(store, costs, opts...)
		if err != nil {
			t.Fatalf("NewInterceptor(%T): %v", store, err)
		}
		_ = ic.Close(t.Context())
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
