package client_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	client "github.com/connectlimit/connectlimit/client/v2"
	"github.com/connectlimit/connectlimit/costmap"
	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
	"github.com/connectlimit/connectlimit/internal/prototest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// The test service: Search (unary, StringValue) costs one "search" token;
// Report (server stream) costs one "requests" token and reserves
// request.max_tokens "tokens", settled to the tokens its messages report,
// with at most one Report of a caller at once ("streams"). Report's topic
// says what it does:
//
//	use=N  send N tokens in messages of 4
//	hold   send one message of 4 tokens, then wait for the call to end
const (
	searchProc = "/test.v1.TestService/Search"
	reportProc = "/test.v1.TestService/Report"
)

type (
	str = wrapperspb.StringValue
	msg = dynamicpb.Message
)

// server is a real connect-go v2 server (HTTP/2 over TLS) with
// connectlimit's v2 interceptor installed, on a memstore on the real clock.
type server struct {
	svc        protoreflect.ServiceDescriptor
	url        string
	httpClient *http.Client
	// calls counts the calls that reached the server, denials those it
	// answered with resource_exhausted.
	calls, denials atomic.Int64
}

// newServer serves the test service limited by buckets, which must
// declare "search", "requests" and "tokens".
func newServer(t testing.TB, buckets map[string]costmap.BucketConfig) *server {
	t.Helper()
	s := &server{}
	s.svc = prototest.NewService(t,
		prototest.Method{Name: "Search", Limit: prototest.Limit("search", proto.Float64(1))},
		prototest.Method{Name: "Report", Report: true, ServerStreaming: true, Limit: &connectlimitv1.Limit{
			Charges: []*connectlimitv1.Charge{
				{Bucket: "requests", Cost: proto.Float64(1)},
				{Bucket: "tokens", Estimate: "request.max_tokens", Actual: "response.tokens"},
			},
			Concurrency: "streams",
		}},
	)
	costs, err := costmap.New(costmap.Config{
		Buckets:     buckets,
		Concurrency: map[string]costmap.ConcurrencyConfig{"streams": {Limit: 1}},
	}, s.svc)
	if err != nil {
		t.Fatal(err)
	}
	store := memstore.New()
	t.Cleanup(func() { _ = store.Close() })
	limit, limits, err := interceptor.NewServerInterceptor(store, costs, interceptor.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = limits.Close(context.Background()) })
	methods := s.svc.Methods()
	in := s.svc.ParentFile().Messages().ByName("ReportRequest")
	srv := connect.NewServer(s.count, limit)
	srv.Register(
		connect.Method{
			Spec: connect.Spec{Procedure: searchProc, Schema: methods.ByName("Search")},
			Handler: func(_ context.Context, _ connect.Spec, stream connect.ServerStream) error {
				var req str
				if err := stream.Receive(&req); err != nil {
					return err
				}
				return stream.Send(wrapperspb.String("found " + req.GetValue()))
			},
		},
		connect.Method{
			Spec: connect.Spec{Procedure: reportProc, Schema: methods.ByName("Report"), StreamType: connect.StreamTypeServer},
			Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
				req := dynamicpb.NewMessage(in)
				if err := stream.Receive(req); err != nil {
					return err
				}
				topic := req.Get(in.Fields().ByName("topic")).String()
				if topic == "hold" {
					if err := stream.Send(prototest.ReportResponse(s.svc, 4, 0)); err != nil {
						return err
					}
					<-ctx.Done()
					return ctx.Err()
				}
				use, _ := strconv.Atoi(strings.TrimPrefix(topic, "use="))
				for sent := 0; sent < use; sent += 4 {
					if err := stream.Send(prototest.ReportResponse(s.svc, int32(min(4, use-sent)), 0)); err != nil {
						return err
					}
				}
				return nil
			},
		},
	)
	mux := http.NewServeMux()
	connecthttp.Mount(mux, srv)
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	s.url, s.httpClient = hs.URL, hs.Client()
	return s
}

// count counts the calls that reach the server and the denials it
// answers; installed before connectlimit's interceptor, it sees both.
func (s *server) count(next connect.ServerFunc) connect.ServerFunc {
	return func(ctx context.Context, spec connect.Spec, stream connect.ServerStream) error {
		s.calls.Add(1)
		err := next(ctx, spec, stream)
		if connect.CodeOf(err) == connect.CodeResourceExhausted {
			s.denials.Add(1)
		}
		return err
	}
}

// protocols are the transport options for each protocol a Connect server
// speaks.
var protocols = []struct {
	name string
	opts []connecthttp.Option
}{
	{name: "connect"},
	{name: "grpc", opts: []connecthttp.Option{connecthttp.WithGRPC()}},
	{name: "grpcweb", opts: []connecthttp.Option{connecthttp.WithGRPCWeb()}},
}

// client returns a connect-go v2 client of s through ic (none if nil).
func (s *server) client(ic *client.Interceptor, opts ...connecthttp.Option) *connect.Client {
	var interceptors []connect.ClientInterceptor
	if ic != nil {
		interceptors = append(interceptors, ic.ClientInterceptor())
	}
	return connect.NewClient(connecthttp.NewTransport(s.httpClient, s.url, opts...), interceptors...)
}

// search calls Search.
func (s *server) search(ctx context.Context, c *connect.Client) error {
	var res str
	return c.CallUnary(ctx, connect.Spec{Procedure: searchProc}, wrapperspb.String("q"), &res)
}

// report runs a Report to its end and returns the messages received and
// the error that ended it, if any.
func (s *server) report(ctx context.Context, c *connect.Client, topic string, maxTokens int32) (int, error) {
	stream, err := c.CallServerStream(ctx, connect.Spec{Procedure: reportProc, StreamType: connect.StreamTypeServer},
		prototest.ReportRequest(s.svc, topic, maxTokens))
	if err != nil {
		return 0, err
	}
	defer func() { _ = stream.Close() }()
	out := s.svc.ParentFile().Messages().ByName("ReportResponse")
	for n := 0; ; n++ {
		if err := stream.Receive(dynamicpb.NewMessage(out)); err != nil {
			if errors.Is(err, io.EOF) {
				return n, nil
			}
			return n, err
		}
	}
}

// newInterceptor returns a client interceptor or fails the test.
func newInterceptor(t testing.TB, opts ...client.Option) *client.Interceptor {
	t.Helper()
	ic, err := client.NewClientInterceptor(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return ic
}

// slow are buckets that barely refill during a test.
func slow() map[string]costmap.BucketConfig {
	return map[string]costmap.BucketConfig{
		"search":   {Capacity: 60, RefillPerSecond: 1},
		"requests": {Capacity: 10, Period: time.Hour},
		"tokens":   {Capacity: 100, Period: time.Hour},
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

// TestQuotaState reads the buckets from a unary call's headers, a
// stream's headers, the trailers of a stream cut off mid-way and a
// denial's headers, over every protocol, and hands each change to a
// subscriber.
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
			c := s.client(ic, p.opts...)

			before := time.Now()
			if err := s.search(t.Context(), c); err != nil {
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
			if n, err := s.report(t.Context(), c, "use=8", 8); err != nil || n != 2 {
				t.Fatalf("report: %d messages, %v", n, err)
			}
			if q, _ := ic.Quota("tokens"); q.Remaining != 92 || q.Capacity != 100 {
				t.Fatalf("tokens after a report: %+v, want 92 of 100", q)
			}

			// This one uses more than it reserved and more than is left:
			// the server cuts it off, and its trailers say the bucket is
			// empty. It is not retried: it delivered messages.
			calls := s.calls.Load()
			n, err := s.report(t.Context(), c, "use=400", 4)
			if connect.CodeOf(err) != connect.CodeResourceExhausted || n == 0 {
				t.Fatalf("greedy report: %d messages, %v; want some, then resource_exhausted", n, err)
			}
			if got := s.calls.Load() - calls; got != 1 {
				t.Fatalf("the cut stream was sent %d times, want once", got)
			}
			if q, _ := ic.Quota("tokens"); q.Remaining != 0 {
				t.Fatalf("tokens after a cut stream: %+v, want 0 left", q)
			}
			// A denial's headers carry the state too.
			var denial error
			var lastAllowed client.Quota
			// Calls outpace the refill (1/s), so the bucket empties within a
			// few more than 60 calls however slow the machine.
			for range 200 {
				if denial = s.search(t.Context(), c); denial != nil {
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

// TestDescribe describes a denial a wait cures, one it does not (a cost
// over capacity), and errors that are not denials.
func TestDescribe(t *testing.T) {
	t.Parallel()
	buckets := slow()
	buckets["search"] = costmap.BucketConfig{Capacity: 1, Period: 1000 * time.Second}
	s := newServer(t, buckets)
	c := s.client(newInterceptor(t)) // RetryInfo beyond the max wait: no retry
	if err := s.search(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err := s.search(t.Context(), c)
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

	_, err = s.report(t.Context(), c, "use=4", 1000)
	if l, ok := client.Describe(err); !ok || l.Bucket != "tokens" || l.RetryAfter != 0 || !strings.Contains(l.Message, "can never be allowed") {
		t.Fatalf("Describe(%v) = %+v, %v; want bucket tokens, no retry", err, l, ok)
	}

	for _, err := range []error{nil, errors.New("boom"), connect.NewError(connect.CodeUnavailable, "down")} {
		if l, ok := client.Describe(err); ok {
			t.Errorf("Describe(%v) = %+v, true; want false", err, l)
		}
	}
}

// TestRetryAfterRetryInfo: the second call in a row is denied with a
// RetryInfo of at most 500ms (long enough that a busy machine does not
// refill the bucket between the two calls), retried after it, and
// succeeds, for a unary call and a server stream, over every protocol.
func TestRetryAfterRetryInfo(t *testing.T) {
	t.Parallel()
	buckets := fast()
	buckets["search"] = costmap.BucketConfig{Capacity: 1, RefillPerSecond: 2}
	buckets["requests"] = costmap.BucketConfig{Capacity: 1, RefillPerSecond: 2}
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			t.Parallel()
			s := newServer(t, buckets)
			c := s.client(newInterceptor(t), p.opts...)
			for i := range 2 {
				if err := s.search(t.Context(), c); err != nil {
					t.Fatalf("search %d: %v", i, err)
				}
			}
			for i := range 2 {
				if n, err := s.report(t.Context(), c, "use=8", 8); err != nil || n != 2 {
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
	c := s.client(newInterceptor(t))

	if _, err := s.report(t.Context(), c, "use=4", 5000); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("report over capacity: %v", err)
	}
	if calls := s.calls.Load(); calls != 1 {
		t.Fatalf("a call over capacity was sent %d times", calls)
	}

	// One report holds the caller's only stream slot.
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	holding, err := c.CallServerStream(ctx, connect.Spec{Procedure: reportProc, StreamType: connect.StreamTypeServer},
		prototest.ReportRequest(s.svc, "hold", 4))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = holding.Close() }()
	if err := holding.Receive(dynamicpb.NewMessage(s.svc.ParentFile().Messages().ByName("ReportResponse"))); err != nil {
		t.Fatalf("holding report: %v", err)
	}
	time.Sleep(60 * time.Millisecond) // the requests bucket refills
	calls := s.calls.Load()
	_, err = s.report(t.Context(), c, "use=4", 4)
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
			c := s.client(newInterceptor(t, tc.opts...))
			const calls = 40
			start := time.Now()
			denied := 0
			for range calls {
				err := s.search(t.Context(), c)
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
	c := s.client(newInterceptor(t))
	if err := s.search(t.Context(), c); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	err := s.search(ctx, c)
	if elapsed := time.Since(start); connect.CodeOf(err) != connect.CodeCanceled || elapsed > time.Second {
		t.Fatalf("canceled during the wait: %v after %v; want canceled at once", err, elapsed)
	}

	ctx, cancel = context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	start = time.Now()
	err = s.search(ctx, c)
	if elapsed := time.Since(start); connect.CodeOf(err) != connect.CodeResourceExhausted || elapsed > 400*time.Millisecond {
		t.Fatalf("deadline before the wait ends: %v after %v; want the denial at once", err, elapsed)
	}
	if calls := s.calls.Load(); calls != 3 {
		t.Fatalf("server saw %d calls, want 3: no retry was sent", calls)
	}
}
