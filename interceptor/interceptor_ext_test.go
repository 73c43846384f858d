package interceptor_test

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/authn"
	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/prototest"
)

const (
	searchProc   = "/test.v1.TestService/Search"
	generateProc = "/test.v1.TestService/Generate"
	freeProc     = "/test.v1.TestService/Free"
)

type (
	req  = wrapperspb.StringValue
	resp = wrapperspb.StringValue
)

// fixture is a real Connect server (HTTP/2 over TLS) with the interceptor
// installed, and clients for it.
type fixture struct {
	clock      *buckettest.Clock
	server     *httptest.Server
	search     *connect.Client[req, resp]
	generate   *connect.Client[req, resp]
	free       *connect.Client[req, resp]
	ic         *interceptor.Interceptor
	streamSent int
}

func testConfig() costmap.Config {
	return costmap.Config{Buckets: map[string]costmap.BucketConfig{
		"search":   {Capacity: 3, RefillPerSecond: 1},
		"generate": {Capacity: 100, RefillPerSecond: 10},
	}}
}

func testService(t testing.TB) protoreflect.ServiceDescriptor {
	return prototest.NewService(t,
		prototest.Method{Name: "Search", Limit: prototest.Limit("search", nil)},
		prototest.Method{Name: "Generate", Limit: prototest.Limit("generate", proto.Float64(40)), ServerStreaming: true},
		prototest.Method{Name: "Free"},
	)
}

// newFixture serves the test service through an interceptor over store (a
// fresh memstore on a fake clock when nil). Authentication is simulated by
// the X-Test-Identity header: "user:NAME" sets authn info to a string,
// "key:KEY" sets an interceptor.Identity with an API key and a user, and
// "ctx:NAME" uses interceptor.ContextWithIdentity.
func newFixture(t *testing.T, store bucket.Store, opts ...interceptor.Option) *fixture {
	t.Helper()
	return newFixtureConfig(t, testConfig(), store, opts...)
}

// newFixtureConfig is newFixture with bucket limits of the caller's.
func newFixtureConfig(t *testing.T, cfg costmap.Config, store bucket.Store, opts ...interceptor.Option) *fixture {
	t.Helper()
	f := &fixture{clock: buckettest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))}
	if store == nil {
		ms := memstore.New(memstore.WithClock(f.clock.Now))
		t.Cleanup(func() { _ = ms.Close() })
		store = ms
	}
	svc := testService(t)
	costs, err := costmap.New(cfg, svc)
	if err != nil {
		t.Fatal(err)
	}
	// Quiet by default; tests that read the log pass their own logger.
	opts = append([]interceptor.Option{interceptor.WithLogger(slog.New(slog.DiscardHandler))}, opts...)
	if !bucket.IsInProcess(store) {
		// The default policy decides locally while the store fails.
		local := memstore.New()
		t.Cleanup(func() { _ = local.Close() })
		opts = append([]interceptor.Option{interceptor.WithLocalStore(local)}, opts...)
	}
	ic, err := interceptor.NewInterceptor(store, costs, opts...)
	if err != nil {
		t.Fatal(err)
	}
	f.ic = ic
	methods := svc.Methods()
	mux := http.NewServeMux()
	echo := func(_ context.Context, r *connect.Request[req]) (*connect.Response[resp], error) {
		if r.Msg.GetValue() == "fail" {
			return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("handler failed"))
		}
		return connect.NewResponse(wrapperspb.String("ok:" + r.Msg.GetValue())), nil
	}
	mux.Handle(searchProc, connect.NewUnaryHandler(searchProc, echo,
		connect.WithSchema(methods.ByName("Search")), ic.HandlerOptions()))
	mux.Handle(freeProc, connect.NewUnaryHandler(freeProc, echo,
		connect.WithSchema(methods.ByName("Free")), ic.HandlerOptions()))
	mux.Handle(generateProc, connect.NewServerStreamHandler(generateProc,
		func(_ context.Context, _ *connect.Request[req], s *connect.ServerStream[resp]) error {
			for i := range 3 {
				if err := s.Send(wrapperspb.String(strings.Repeat("x", i+1))); err != nil {
					return err
				}
			}
			return nil
		}, connect.WithSchema(methods.ByName("Generate")), ic.HandlerOptions()))
	auth := authn.NewMiddleware(func(ctx context.Context, r authn.Request) (any, error) {
		kind, name, _ := strings.Cut(r.Header().Get("X-Test-Identity"), ":")
		switch kind {
		case "user":
			return name, nil
		case "key":
			return interceptor.Identity{APIKey: name, User: "owner-of-" + name}, nil
		}
		return nil, nil //nolint:nilnil // anonymous
	})
	handler := auth.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if kind, name, _ := strings.Cut(r.Header.Get("X-Test-Identity"), ":"); kind == "ctx" {
			r = r.WithContext(interceptor.ContextWithIdentity(r.Context(), interceptor.Identity{User: name}))
		}
		mux.ServeHTTP(w, r)
	}))
	f.server = httptest.NewUnstartedServer(handler)
	f.server.EnableHTTP2 = true
	f.server.StartTLS()
	t.Cleanup(f.server.Close)
	f.search = connect.NewClient[req, resp](f.server.Client(), f.server.URL+searchProc)
	f.generate = connect.NewClient[req, resp](f.server.Client(), f.server.URL+generateProc)
	f.free = connect.NewClient[req, resp](f.server.Client(), f.server.URL+freeProc)
	return f
}

func callSearch(t *testing.T, c *connect.Client[req, resp], identity string) (*connect.Response[resp], error) {
	t.Helper()
	r := connect.NewRequest(wrapperspb.String("q"))
	if identity != "" {
		r.Header().Set("X-Test-Identity", identity)
	}
	return c.CallUnary(t.Context(), r)
}

// denial checks that err is a rate-limit denial and returns its details.
func denial(t *testing.T, err error) (*connect.Error, *errdetails.RetryInfo, *errdetails.QuotaFailure) {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
		t.Fatalf("err = %v, want resource_exhausted", err)
	}
	var ri *errdetails.RetryInfo
	var qf *errdetails.QuotaFailure
	for _, d := range ce.Details() {
		v, derr := d.Value()
		if derr != nil {
			t.Fatalf("decoding detail %s: %v", d.Type(), derr)
		}
		switch v := v.(type) {
		case *errdetails.RetryInfo:
			ri = v
		case *errdetails.QuotaFailure:
			qf = v
		}
	}
	return ce, ri, qf
}

func TestUnaryAllowedAndDenied(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"connect", nil},
		{"grpc", []connect.ClientOption{connect.WithGRPC()}},
		{"grpc-web", []connect.ClientOption{connect.WithGRPCWeb()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, nil)
			client := connect.NewClient[req, resp](f.server.Client(), f.server.URL+searchProc, tc.opts...)
			for i, wantR := range []string{"2", "1", "0"} {
				res, err := callSearch(t, client, "")
				if err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
				if got, want := res.Header().Get("RateLimit-Policy"), `"search";q=3;w=3`; got != want {
					t.Errorf("call %d: RateLimit-Policy = %q, want %q", i, got, want)
				}
				if got, want := res.Header().Get("RateLimit"), `"search";r=`+wantR+`;t=`+string(rune('1'+i)); got != want {
					t.Errorf("call %d: RateLimit = %q, want %q", i, got, want)
				}
			}
			f.clock.Advance(250 * time.Millisecond)
			_, err := callSearch(t, client, "")
			ce, ri, qf := denial(t, err)
			if ri == nil || ri.GetRetryDelay().AsDuration() != 750*time.Millisecond {
				t.Errorf("RetryInfo = %v, want retry_delay 0.75s", ri)
			}
			if qf == nil || len(qf.GetViolations()) != 1 {
				t.Fatalf("QuotaFailure = %v, want one violation", qf)
			}
			if v := qf.GetViolations()[0]; v.GetSubject() != "ip:127.0.0.1" || v.GetQuotaId() != "search" || !strings.Contains(v.GetDescription(), `"search"`) {
				t.Errorf("violation = %v, want subject ip:127.0.0.1 and bucket search", v)
			}
			if msg := ce.Message(); !strings.Contains(msg, `bucket "search"`) || !strings.Contains(msg, "750ms") {
				t.Errorf("message %q does not name the bucket and the wait", msg)
			}
			for k, want := range map[string]string{
				"Retry-After":      "1",
				"RateLimit-Policy": `"search";q=3;w=3`,
				"RateLimit":        `"search";r=0;t=3`,
			} {
				if got := ce.Meta().Get(k); got != want {
					t.Errorf("denial header %s = %q, want %q", k, got, want)
				}
			}
			// The denial charged nothing: 0.75 s later exactly one call fits.
			f.clock.Advance(750 * time.Millisecond)
			if _, err := callSearch(t, client, ""); err != nil {
				t.Fatalf("after RetryAfter: %v", err)
			}
			if _, err := callSearch(t, client, ""); err == nil {
				t.Fatal("second call after RetryAfter allowed")
			}
		})
	}
}

func TestDenialOverHTTPIs429WithHeaders(t *testing.T) {
	t.Parallel()
	f := newFixture(t, nil)
	post := func() *http.Response {
		r, err := http.NewRequestWithContext(t.Context(), http.MethodPost, f.server.URL+searchProc, strings.NewReader(`"q"`))
		if err != nil {
			t.Fatal(err)
		}
		r.Header.Set("Content-Type", "application/json")
		res, err := f.server.Client().Do(r)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = res.Body.Close() })
		return res
	}
	for range 3 {
		if res := post(); res.StatusCode != http.StatusOK {
			t.Fatalf("status %d, want 200", res.StatusCode)
		}
	}
	res := post()
	if res.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("status %d, want 429", res.StatusCode)
	}
	if got := res.Header.Get("Retry-After"); got != "1" {
		t.Errorf("Retry-After = %q, want 1", got)
	}
	if res.Header.Get("RateLimit") == "" || res.Header.Get("RateLimit-Policy") == "" {
		t.Errorf("429 lacks RateLimit headers: %v", res.Header)
	}
}

func TestHandlerErrorKeepsHeaders(t *testing.T) {
	t.Parallel()
	f := newFixture(t, nil)
	_, err := f.search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("fail")))
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeFailedPrecondition {
		t.Fatalf("err = %v, want the handler's failed_precondition", err)
	}
	if got := ce.Meta().Get("RateLimit"); got != `"search";r=2;t=1` {
		t.Errorf("RateLimit on handler error = %q", got)
	}
}

func TestServerStream(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"connect", nil},
		{"grpc", []connect.ClientOption{connect.WithGRPC()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, nil)
			client := connect.NewClient[req, resp](f.server.Client(), f.server.URL+generateProc, tc.opts...)
			open := func() (*connect.ServerStreamForClient[resp], int, error) {
				stream, err := client.CallServerStream(t.Context(), connect.NewRequest(wrapperspb.String("topic")))
				if err != nil {
					return nil, 0, err
				}
				n := 0
				for stream.Receive() {
					n++
				}
				return stream, n, stream.Err()
			}
			for i, want := range []string{`"generate";r=60;t=4`, `"generate";r=20;t=8`} {
				stream, n, err := open()
				if err != nil || n != 3 {
					t.Fatalf("stream %d: %d messages, err %v; want 3, nil", i, n, err)
				}
				if got := stream.ResponseHeader().Get("RateLimit"); got != want {
					t.Errorf("stream %d: RateLimit = %q, want %q", i, got, want)
				}
				if got := stream.ResponseHeader().Get("RateLimit-Policy"); got != `"generate";q=100;w=10` {
					t.Errorf("stream %d: RateLimit-Policy = %q", i, got)
				}
			}
			_, n, err := open()
			if n != 0 {
				t.Fatalf("denied stream delivered %d messages", n)
			}
			_, ri, qf := denial(t, err)
			if ri == nil || ri.GetRetryDelay().AsDuration() != 2*time.Second {
				t.Errorf("RetryInfo = %v, want 2s", ri)
			}
			if qf == nil || qf.GetViolations()[0].GetQuotaId() != "generate" {
				t.Errorf("QuotaFailure = %v", qf)
			}
		})
	}
}

func TestServerStreamDenialHeaders(t *testing.T) {
	t.Parallel()
	f := newFixture(t, nil)
	drain := func() (*connect.ServerStreamForClient[resp], error) {
		stream, err := f.generate.CallServerStream(t.Context(), connect.NewRequest(wrapperspb.String("topic")))
		if err != nil {
			return nil, err
		}
		for stream.Receive() { //nolint:revive // draining
		}
		return stream, stream.Err()
	}
	for range 2 {
		if _, err := drain(); err != nil {
			t.Fatal(err)
		}
	}
	stream, err := drain()
	if err == nil {
		t.Fatal("third stream allowed")
	}
	// The denial's headers are real response headers, not trailers.
	if stream == nil || stream.ResponseHeader().Get("Retry-After") != "2" {
		t.Errorf("stream Retry-After header = %q, want 2", stream.ResponseHeader().Get("Retry-After"))
	}
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Meta().Get("Retry-After") != "2" {
		t.Errorf("Retry-After = %q, want 2", ce.Meta().Get("Retry-After"))
	}
}

func TestUnlimitedProcedure(t *testing.T) {
	t.Parallel()
	f := newFixture(t, nil)
	for i := range 10 {
		res, err := f.free.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("x")))
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if h := res.Header().Get("RateLimit"); h != "" {
			t.Fatalf("unlimited procedure sent RateLimit %q", h)
		}
	}
}

func TestIdentityPrecedence(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		identity    string
		wantSubject string
	}{
		{"anonymous is keyed by IP", "", "ip:127.0.0.1"},
		{"authn string info is the user", "user:alice", "user:alice"},
		{"API key beats user", "key:k-123", "key:k-123"},
		{"ContextWithIdentity", "ctx:bob", "user:bob"},
		{"odd user names are hashed", "user:" + strings.Repeat("é", 200), "user:#"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, nil)
			for range 3 {
				if _, err := callSearch(t, f.search, tc.identity); err != nil {
					t.Fatal(err)
				}
			}
			_, err := callSearch(t, f.search, tc.identity)
			_, _, qf := denial(t, err)
			if got := qf.GetViolations()[0].GetSubject(); !strings.HasPrefix(got, tc.wantSubject) || len(got) > 160 {
				t.Fatalf("subject = %q, want %q", got, tc.wantSubject)
			}
			// Other identities still have their own full buckets.
			for _, other := range []string{"user:zed", "key:other", ""} {
				if other == tc.identity {
					continue
				}
				if _, err := callSearch(t, f.search, other); err != nil {
					t.Fatalf("identity %q shares a bucket with %q: %v", other, tc.identity, err)
				}
			}
		})
	}
}

func TestClientSideCallsPassThrough(t *testing.T) {
	t.Parallel()
	f := newFixture(t, nil)
	store := memstore.New()
	t.Cleanup(func() { _ = store.Close() })
	costs, err := costmap.New(testConfig(), testService(t))
	if err != nil {
		t.Fatal(err)
	}
	ic, err := interceptor.NewInterceptor(store, costs)
	if err != nil {
		t.Fatal(err)
	}
	// The client's own interceptor must not charge: ten calls from a
	// client limited to three would otherwise fail locally.
	client := connect.NewClient[req, resp](f.server.Client(), f.server.URL+freeProc,
		connect.WithInterceptors(ic), connect.WithSchema(testService(t).Methods().ByName("Search")))
	for i := range 10 {
		if _, err := client.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("x"))); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	if store.Len() != 0 {
		t.Fatalf("client-side calls charged %d buckets", store.Len())
	}
}
