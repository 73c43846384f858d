package interceptor_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	connectv1 "connectrpc.com/connect"
	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"connectrpc.com/connect/v2/connectproto"
	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	interceptorv1 "github.com/connectlimit/connectlimit/interceptor"
	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
	"github.com/connectlimit/connectlimit/limiter"
)

func TestNewServerInterceptorErrors(t *testing.T) {
	t.Parallel()
	costs, err := costmap.New(testConfig())
	if err != nil {
		t.Fatal(err)
	}
	mem := memstore.New()
	t.Cleanup(func() { _ = mem.Close() })
	// A store that can fail; these tests never call it.
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = client.Close() })
	remote := redisstore.New(client)
	for _, tc := range []struct {
		name   string
		store  bucket.Store
		costs  *costmap.Map
		opts   []interceptor.Option
		wantIn string
	}{
		{"nil store", nil, costs, nil, "store"},
		{"nil costs", mem, nil, nil, "cost map"},
		{"nil identity func", mem, costs, []interceptor.Option{interceptor.WithIdentityFunc(nil)}, "WithIdentityFunc"},
		{"timeout under 1ms", mem, costs, []interceptor.Option{interceptor.WithStoreTimeout(time.Nanosecond)}, "at least 1ms, got 1ns"},
		{"bad policy", mem, costs, []interceptor.Option{interceptor.WithFailurePolicy(9)}, "FailurePolicy(9)"},
		{"nil logger", mem, costs, []interceptor.Option{interceptor.WithLogger(nil)}, "WithLogger"},
		{"negative log interval", mem, costs, []interceptor.Option{interceptor.WithLogInterval(-time.Second)}, "log interval"},
		{"invalid proxy prefix", mem, costs, []interceptor.Option{interceptor.WithTrustedProxies(netip.Prefix{})}, "proxy"},
		{"local share over 1", mem, costs, []interceptor.Option{interceptor.WithLocalShare(1.5)}, "1.5"},
		{"warn fraction of 1", mem, costs, []interceptor.Option{interceptor.WithWarnFraction(1)}, "warn fraction"},
		{"settle retry past the ID window", mem, costs, []interceptor.Option{interceptor.WithSettleQueue(8, time.Hour)}, "at most 59m0s"},
		{"overdraft past MaxTokens", mem, costs, []interceptor.Option{interceptor.WithStreamOverdraft(1e16)}, "overdraft"},
		{"local policy without a local store", remote, costs, nil, "WithLocalStore"},
		{"local store that can fail", remote, costs, []interceptor.Option{interceptor.WithLocalStore(remote)}, "in-process"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			limit, lim, err := interceptor.NewServerInterceptor(tc.store, tc.costs, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) || limit != nil || lim != nil {
				t.Fatalf("NewServerInterceptor = %v, %v, %v; want an error mentioning %q", limit != nil, lim, err, tc.wantIn)
			}
		})
	}
}

// TestSharedLimiter serves the test service on both majors with one
// Limiter, built by either adapter: a caller's buckets are the same
// whichever major serves it, and each adapter's identity function
// identifies the other major's calls.
func TestSharedLimiter(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		build func(t *testing.T, store bucket.Store, costs *costmap.Map) *limiter.Limiter
	}{
		{"built by the v2 adapter", func(t *testing.T, store bucket.Store, costs *costmap.Map) *limiter.Limiter {
			_, lim, err := interceptor.NewServerInterceptor(store, costs,
				interceptor.WithIdentityFunc(func(_ context.Context, call *connect.CallInfo) (interceptor.Identity, error) {
					return interceptor.Identity{User: call.RequestHeader().Get(userHeader)}, nil
				}))
			if err != nil {
				t.Fatal(err)
			}
			return lim
		}},
		{"built by the v1 adapter", func(t *testing.T, store bucket.Store, costs *costmap.Map) *limiter.Limiter {
			ic, err := interceptorv1.NewInterceptor(store, costs,
				interceptorv1.WithIdentityFunc(func(_ context.Context, _ connectv1.Peer, h http.Header) (interceptorv1.Identity, error) {
					return interceptorv1.Identity{User: h.Get(userHeader)}, nil
				}))
			if err != nil {
				t.Fatal(err)
			}
			return ic.Limiter()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			v1, costs := newTarget(t, "v1", setup{})
			lim := tc.build(t, v1.store, costs)
			t.Cleanup(func() { _ = lim.Close(context.Background()) })
			v1.lim = lim
			v1.serve(t, v1Handlers(v1.svc, connectv1.WithInterceptors(interceptorv1.NewFromLimiter(lim)), nil))
			v2 := &target{major: "v2", svc: v1.svc, cfg: v1.cfg, clock: v1.clock, store: v1.store, lim: lim}
			v2.serve(t, v2Handlers(v2.svc, lim, interceptor.NewServerInterceptorFromLimiter(lim)))
			for i, tg := range []*target{v1, v2, v1} {
				if _, err := tg.search(t.Context(), "shared"); err != nil {
					t.Fatalf("call %d (%s): %v", i, tg.major, err)
				}
			}
			for _, tg := range []*target{v2, v1} {
				_, err := tg.search(t.Context(), "shared")
				_, _, qf := details(t, err)
				if v := qf.GetViolations(); len(v) != 1 || v[0].GetSubject() != "user:shared" {
					t.Errorf("%s: QuotaFailure %v, want user:shared", tg.major, qf)
				}
			}
		})
	}
}

// TestStreamFlushedHeaders flushes a stream's headers with SendHeaders
// before its first message: the headers then show the reservation, and
// when the first message is denied its fields travel in trailers.
func TestStreamFlushedHeaders(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.Buckets["tokens"] = costmap.BucketConfig{Capacity: 10, RefillPerSecond: 1e-9}
	tg := startV2(t, setup{cfg: cfg})

	// A server stream: the reservation shows in the flushed headers.
	_, header, err := tg.report(t.Context(), "flush,use=4", 5, "")
	if err != nil {
		t.Fatal(err)
	}
	if got := header.Get("RateLimit"); !strings.Contains(got, `"tokens";r=5`) {
		t.Errorf("RateLimit = %q, want the reservation (tokens 5)", got)
	}
	// It settled to 4: 6 tokens left. A bidi message of 8 is denied after
	// the headers were flushed without one.
	eventually(t, "the stream settles", func() bool { return near(tg.levels(t, "ip:127.0.0.1", "tokens")["tokens"], 6) })
	ctx, info := connect.NewClientContext(t.Context())
	info.RequestHeader().Set("X-Test-Flush", "1")
	spec := connect.Spec{Procedure: chatProc, StreamType: connect.StreamTypeBidi, Schema: tg.svc.Methods().ByName("Chat")}
	stream, err := connect.NewClient(connecthttp.NewTransport(tg.http, tg.url)).CallClientStream(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = stream.Close() }()
	if err := stream.Send(tg.message("aaaaaaaa")); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	err = stream.Receive(dynamicpb.NewMessage(tg.svc.ParentFile().Messages().ByName("ReportResponse")))
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("err = %v, want resource_exhausted", err)
	}
	if got := info.ResponseHeader().Get("RateLimit"); got != "" {
		t.Errorf("RateLimit %q in headers flushed before the denial", got)
	}
	if got := info.ResponseTrailer().Get("RateLimit"); !strings.Contains(got, `"tokens";r=6`) || info.ResponseTrailer().Get("Retry-After") == "" {
		t.Errorf("trailers %v, want RateLimit (tokens 6) and Retry-After", info.ResponseTrailer())
	}
	var ce *connect.Error
	if !errors.As(err, &ce) || !hasRetryInfo(ce) {
		t.Errorf("err = %v, want a RetryInfo detail", err)
	}
}

func hasRetryInfo(ce *connect.Error) bool {
	for _, d := range ce.Details() {
		if v, err := connectproto.UnmarshalErrorDetail(d); err == nil {
			if _, ok := v.(*errdetails.RetryInfo); ok {
				return true
			}
		}
	}
	return false
}

// TestRefusedBeforeDecoding: a unary call with a fixed cost is reserved
// before its request is read, so that a call that will be denied costs no
// decoding (connect-go v2 runs interceptors before it reads the request).
// A request that then fails to decode keeps its fixed cost, as any call
// whose handler fails does.
func TestRefusedBeforeDecoding(t *testing.T) {
	t.Parallel()
	tg := startV2(t, setup{})
	post := func(body string) *http.Response {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, tg.url+searchProc, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		res, err := tg.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		_ = res.Body.Close()
		return res
	}
	if res := post("not json"); res.StatusCode != http.StatusBadRequest {
		t.Fatalf("an undecodable request: status %d, want 400", res.StatusCode)
	}
	if got := tg.levels(t, "ip:127.0.0.1", "search")["search"]; !near(got, 2) {
		t.Errorf("search holds %v after an undecodable request, want 2: its fixed cost is kept", got)
	}
	for range 2 {
		if res := post(`"q"`); res.StatusCode != http.StatusOK {
			t.Fatalf("status %d, want 200", res.StatusCode)
		}
	}
	if res := post("not json"); res.StatusCode != http.StatusTooManyRequests || res.Header.Get("RateLimit") == "" {
		t.Fatalf("an undecodable request to an empty bucket: status %d, headers %v; want 429 with RateLimit", res.StatusCode, res.Header)
	}
}

// TestIdentityFuncError: the identity function's *connect.Error reaches
// the client as is, and the call is not charged.
func TestIdentityFuncError(t *testing.T) {
	t.Parallel()
	tg, costs := newTarget(t, "v2", setup{})
	limit, lim, err := interceptor.NewServerInterceptor(tg.store, costs,
		interceptor.WithLogger(slog.New(slog.DiscardHandler)),
		interceptor.WithIdentityFunc(func(_ context.Context, call *connect.CallInfo) (interceptor.Identity, error) {
			if call.RequestHeader().Get(userHeader) == "" {
				return interceptor.Identity{}, connect.NewError(connect.CodeUnauthenticated, "who are you?")
			}
			return interceptor.Identity{}, errors.New("the user database is down")
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lim.Close(context.Background()) })
	tg.lim = lim
	tg.serve(t, v2Handlers(tg.svc, lim, limit))
	_, err = tg.search(t.Context(), "")
	var ce *connectv1.Error
	if !errors.As(err, &ce) || ce.Code() != connectv1.CodeUnauthenticated || ce.Message() != "who are you?" {
		t.Errorf("err = %v, want the identity function's unauthenticated error", err)
	}
	_, err = tg.search(t.Context(), "u")
	if !errors.As(err, &ce) || ce.Code() != connectv1.CodeInternal || strings.Contains(ce.Message(), "database") {
		t.Errorf("err = %v, want an internal error without the cause's text", err)
	}
}

// TestNotDispatchedByServer: a ServerFunc called without a server's
// CallInfo (not through connect.Server) is passed through.
func TestNotDispatchedByServer(t *testing.T) {
	t.Parallel()
	tg, costs := newTarget(t, "v2", setup{})
	limit, lim, err := interceptor.NewServerInterceptor(tg.store, costs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lim.Close(context.Background()) })
	called := false
	next := limit(func(context.Context, connect.Spec, connect.ServerStream) error {
		called = true
		return nil
	})
	if err := next(t.Context(), connect.Spec{Procedure: searchProc, Schema: tg.svc.Methods().ByName("Search")}, nil); err != nil || !called {
		t.Fatalf("err %v, called %v", err, called)
	}
}

// TestHeaderNames lists what CORS must expose.
func TestHeaderNames(t *testing.T) {
	t.Parallel()
	if got := strings.Join(interceptor.HeaderNames(), ","); got != "RateLimit,RateLimit-Policy,Retry-After,Connectlimit-Warning" {
		t.Fatalf("HeaderNames = %s", got)
	}
}

// TestQuotaServiceOnly serves only the quota service, behind its own
// interceptor, as a server that mounts nothing else would.
func TestQuotaServiceOnly(t *testing.T) {
	t.Parallel()
	tg, costs := newTarget(t, "v2", setup{})
	limit, lim, err := interceptor.NewServerInterceptor(tg.store, costs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lim.Close(context.Background()) })
	server := connect.NewServer(limit)
	interceptor.RegisterQuotaService(server, lim)
	mux := http.NewServeMux()
	connecthttp.Mount(mux, server)
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	res, err := http.Post(hs.URL+"/connectlimit.v1.QuotaService/GetQuota", "application/json", bytes.NewReader([]byte(`{"cost": -1}`))) //nolint:noctx // test
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	_ = res.Body.Close()
	if res.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "cost must be") {
		t.Fatalf("a negative cost: status %d, body %s; want invalid_argument", res.StatusCode, body)
	}
}
