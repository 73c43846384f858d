package client_test

import (
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"connectrpc.com/connect/v2/connectproto"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	client "github.com/connectlimit/connectlimit/client/v2"
)

// outcome is what the scripted server answers one call.
type outcome struct {
	code      connect.Code // 0: success
	retryInfo time.Duration
	noInfo    bool // no RetryInfo detail
	afterMsg  bool // (streams) send one message before the error
}

var (
	ok           = outcome{}
	deny         = func(d time.Duration) outcome { return outcome{code: connect.CodeResourceExhausted, retryInfo: d} }
	denyForever  = outcome{code: connect.CodeResourceExhausted, noInfo: true}
	unavailable  = outcome{code: connect.CodeUnavailable, retryInfo: time.Second}
	cutAfterMsg  = outcome{code: connect.CodeResourceExhausted, retryInfo: time.Second, afterMsg: true}
	scriptedTime = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
)

var (
	testUnary  = connect.Spec{Procedure: "/test.v1.Scripted/Unary"}
	testStream = connect.Spec{Procedure: "/test.v1.Scripted/Stream", StreamType: connect.StreamTypeServer}
	testBidi   = connect.Spec{Procedure: "/test.v1.Scripted/Bidi", StreamType: connect.StreamTypeBidi}
)

// scripted is a connect-go v2 server whose every call takes the next
// outcome of its script (the last one repeats), with no limiter of its
// own. A denial carries Retry-After and RateLimit headers; a success says
// that bucket "s" holds 2 tokens, refills 1 a second, and is empty.
type scripted struct {
	mu     sync.Mutex
	script []outcome
	calls  int
}

func (s *scripted) next() outcome {
	s.mu.Lock()
	defer s.mu.Unlock()
	o := s.script[min(s.calls, len(s.script)-1)]
	s.calls++
	return o
}

func (s *scripted) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

func (o outcome) err(ctx context.Context) error {
	err := connect.NewError(o.code, "scripted")
	if !o.noInfo {
		detail, _ := connectproto.NewErrorDetail(&errdetails.RetryInfo{RetryDelay: durationpb.New(o.retryInfo)})
		err = err.WithDetail(detail)
	}
	if info, ok := connect.CallInfoForServerContext(ctx); ok && o.code == connect.CodeResourceExhausted && !o.afterMsg {
		info.ResponseHeader().Set("Retry-After", strconv.Itoa(int(math.Ceil(o.retryInfo.Seconds()))))
		info.ResponseHeader().Set(client.HeaderRateLimit, `"s";r=0;t=2`)
	}
	return err
}

func newScripted(t *testing.T, script ...outcome) (*scripted, string, *http.Client) {
	t.Helper()
	s := &scripted{script: script}
	srv := connect.NewServer()
	srv.Register(
		connect.Method{Spec: testUnary, Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			var req str
			if err := stream.Receive(&req); err != nil {
				return err
			}
			if o := s.next(); o.code != 0 {
				return o.err(ctx)
			}
			info, _ := connect.CallInfoForServerContext(ctx)
			info.ResponseHeader().Set(client.HeaderRateLimitPolicy, `"s";q=2;w=2`)
			info.ResponseHeader().Set(client.HeaderRateLimit, `"s";r=0;t=2`)
			return stream.Send(wrapperspb.String("ok"))
		}},
		connect.Method{Spec: testStream, Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			var req str
			if err := stream.Receive(&req); err != nil {
				return err
			}
			o := s.next()
			if o.code == 0 || o.afterMsg {
				if err := stream.Send(wrapperspb.String("ok")); err != nil {
					return err
				}
			}
			if o.code != 0 {
				return o.err(ctx)
			}
			return nil
		}},
		connect.Method{Spec: testBidi, Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			info, _ := connect.CallInfoForServerContext(ctx)
			info.ResponseHeader().Set(client.HeaderRateLimitPolicy, `"s";q=100;w=1`)
			info.ResponseHeader().Set(client.HeaderRateLimit, `"s";r=99`)
			for {
				var m str
				if err := stream.Receive(&m); err != nil {
					if errors.Is(err, io.EOF) {
						return nil
					}
					return err
				}
				if err := stream.Send(&m); err != nil {
					return err
				}
			}
		}},
	)
	mux := http.NewServeMux()
	connecthttp.Mount(mux, srv)
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	return s, hs.URL, hs.Client()
}

func scriptedClient(url string, httpClient *http.Client, ic *client.Interceptor) *connect.Client {
	return connect.NewClient(connecthttp.NewTransport(httpClient, url), ic.ClientInterceptor())
}

// callUnary calls the scripted unary procedure.
func callUnary(ctx context.Context, c *connect.Client) error {
	var res str
	return c.CallUnary(ctx, testUnary, wrapperspb.String("x"), &res)
}

// callStream runs the scripted server stream to its end.
func callStream(ctx context.Context, c *connect.Client) error {
	stream, err := c.CallServerStream(ctx, testStream, wrapperspb.String("x"))
	if err != nil {
		return err
	}
	defer func() { _ = stream.Close() }()
	for {
		var m str
		if err := stream.Receive(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// TestRetry walks retries through scripted answers on a fake clock that
// advances by what the interceptor waits; jitter is fixed at half its
// spread (5% of the wait, at most 0.5s).
func TestRetry(t *testing.T) {
	t.Parallel()
	jitter := func(d time.Duration) time.Duration { return d + min(d/20, 500*time.Millisecond) }
	for _, tc := range []struct {
		name      string
		opts      []client.Option
		script    []outcome
		wantCalls int
		wantSlept []time.Duration
		wantCode  connect.Code // 0: success
	}{
		{name: "denied once, then allowed", script: []outcome{deny(time.Second), ok},
			wantCalls: 2, wantSlept: []time.Duration{jitter(time.Second)}},
		{name: "no RetryInfo: no retry", script: []outcome{denyForever, ok},
			wantCalls: 1, wantCode: connect.CodeResourceExhausted},
		{name: "RetryInfo on another code: no retry", script: []outcome{unavailable, ok},
			wantCalls: 1, wantCode: connect.CodeUnavailable},
		{name: "attempts run out", script: []outcome{deny(time.Second)},
			wantCalls: 3, wantSlept: []time.Duration{jitter(time.Second), jitter(time.Second)}, wantCode: connect.CodeResourceExhausted},
		{name: "more attempts", opts: []client.Option{client.WithRetry(5)}, script: []outcome{deny(time.Second), deny(time.Second), deny(time.Second), deny(time.Second), ok},
			wantCalls: 5, wantSlept: []time.Duration{jitter(time.Second), jitter(time.Second), jitter(time.Second), jitter(time.Second)}},
		{name: "without retry", opts: []client.Option{client.WithoutRetry()}, script: []outcome{deny(time.Second), ok},
			wantCalls: 1, wantCode: connect.CodeResourceExhausted},
		{name: "a wait past the max wait is not started", script: []outcome{deny(11 * time.Second), ok},
			wantCalls: 1, wantCode: connect.CodeResourceExhausted},
		{name: "earlier waits count toward the max wait", script: []outcome{deny(6 * time.Second), deny(6 * time.Second), ok},
			wantCalls: 2, wantSlept: []time.Duration{jitter(6 * time.Second)}, wantCode: connect.CodeResourceExhausted},
		{name: "a longer max wait; jitter at most 1s", opts: []client.Option{client.WithMaxWait(time.Minute)}, script: []outcome{deny(30 * time.Second), ok},
			wantCalls: 2, wantSlept: []time.Duration{jitter(30 * time.Second)}},
		{name: "no waiting at all", opts: []client.Option{client.WithMaxWait(0)}, script: []outcome{deny(time.Millisecond), ok},
			wantCalls: 1, wantCode: connect.CodeResourceExhausted},
		{name: "a zero RetryInfo retries at once", script: []outcome{deny(0), ok},
			wantCalls: 2, wantSlept: []time.Duration{0}},
		{name: "a stream that delivered a message is not retried", script: []outcome{cutAfterMsg, ok},
			wantCalls: 1, wantCode: connect.CodeResourceExhausted},
	} {
		for _, streaming := range []bool{false, true} {
			name := tc.name + "/unary"
			if streaming {
				name = tc.name + "/stream"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				if !streaming && tc.script[0].afterMsg {
					t.Skip("unary calls have no messages before their error")
				}
				s, url, httpClient := newScripted(t, tc.script...)
				clock := client.NewFakeClock(scriptedTime, true)
				ic := newInterceptor(t, append([]client.Option{client.WithClock(clock), client.WithRandom(func() float64 { return 0.5 })}, tc.opts...)...)
				c := scriptedClient(url, httpClient, ic)
				var err error
				if streaming {
					err = callStream(t.Context(), c)
				} else {
					err = callUnary(t.Context(), c)
				}
				if got := connect.CodeOf(err); (tc.wantCode == 0 && err != nil) || (tc.wantCode != 0 && got != tc.wantCode) {
					t.Fatalf("error %v, want code %v", err, tc.wantCode)
				}
				if got := s.count(); got != tc.wantCalls {
					t.Fatalf("server saw %d calls, want %d", got, tc.wantCalls)
				}
				if got := clock.Slept(); !reflect.DeepEqual(got, tc.wantSlept) && (len(got) > 0 || len(tc.wantSlept) > 0) {
					t.Fatalf("slept %v, want %v", got, tc.wantSlept)
				}
			})
		}
	}
}

// TestRetryShowsTheLastAttempt: after a retry, the call's CallInfo holds
// the response headers of the attempt that counted, not the denial's, and
// the retry carried the call's request headers.
func TestRetryShowsTheLastAttempt(t *testing.T) {
	t.Parallel()
	_, url, httpClient := newScripted(t, deny(time.Second), ok)
	ic := newInterceptor(t, client.WithClock(client.NewFakeClock(scriptedTime, true)))
	var seen []string
	inspect := func(next connect.ClientFunc) connect.ClientFunc {
		return func(ctx context.Context, spec connect.Spec) (connect.ClientStream, error) {
			info, _ := connect.CallInfoForClientContext(ctx)
			seen = append(seen, info.RequestHeader().Get("X-Request-Id"))
			return next(ctx, spec)
		}
	}
	c := connect.NewClient(connecthttp.NewTransport(httpClient, url), ic.ClientInterceptor(), inspect)
	ctx, info := connect.NewClientContext(t.Context())
	info.RequestHeader().Set("X-Request-Id", "r1")
	if err := callUnary(ctx, c); err != nil {
		t.Fatal(err)
	}
	if got := info.ResponseHeader().Get("Retry-After"); got != "" {
		t.Errorf("Retry-After %q from the denied attempt is still in the CallInfo", got)
	}
	if got := info.ResponseHeader().Get(client.HeaderRateLimitPolicy); got != `"s";q=2;w=2` {
		t.Errorf("RateLimit-Policy %q, want the successful attempt's", got)
	}
	if !reflect.DeepEqual(seen, []string{"r1", "r1"}) {
		t.Errorf("attempts carried X-Request-Id %q, want r1 twice", seen)
	}
	// The denial's headers updated the state, then the success's.
	if q, ok := ic.Quota("s"); !ok || q.Capacity != 2 {
		t.Errorf("quota %+v, %v", q, ok)
	}
}

// TestRetryCanceledOnFakeClock cancels a call while it waits on the fake
// clock: it ends with canceled, and is not sent again.
func TestRetryCanceledOnFakeClock(t *testing.T) {
	t.Parallel()
	s, url, httpClient := newScripted(t, deny(5*time.Second), ok)
	clock := client.NewFakeClock(scriptedTime, false)
	c := scriptedClient(url, httpClient, newInterceptor(t, client.WithClock(clock)))
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- callUnary(ctx, c) }()
	clock.WaitForSleepers(t, 1)
	clock.Advance(4 * time.Second) // not yet
	cancel()
	if err := <-done; connect.CodeOf(err) != connect.CodeCanceled {
		t.Fatalf("error %v, want canceled", err)
	}
	if got := s.count(); got != 1 {
		t.Fatalf("server saw %d calls, want 1", got)
	}
}

// TestPacingOnFakeClock paces calls by the state the scripted server
// reports (bucket "s", 2 tokens, 1 a second, left empty by every call).
func TestPacingOnFakeClock(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		opts      []client.Option
		wantSlept []time.Duration
	}{
		{"waits for the refill", []client.Option{client.WithCost(testUnary.Procedure, "s", 1)}, []time.Duration{time.Second, time.Second}},
		{"a cost function", []client.Option{client.WithCostFunc(func(procedure string, msg any) []client.Cost {
			if procedure != testUnary.Procedure || msg.(*str).GetValue() != "x" { //nolint:forcetypeassert // one message type here
				t.Errorf("cost of %s %v", procedure, msg)
			}
			return []client.Cost{{Bucket: "s", Tokens: 0.5}, {Bucket: "", Tokens: 9}, {Bucket: "s", Tokens: -1}}
		})}, []time.Duration{500 * time.Millisecond, 500 * time.Millisecond}},
		{"over capacity: no say", []client.Option{client.WithCost(testUnary.Procedure, "s", 3)}, nil},
		{"a wait past the max wait is not started", []client.Option{client.WithCost(testUnary.Procedure, "s", 1), client.WithMaxWait(999 * time.Millisecond)}, nil},
		{"another procedure's cost", []client.Option{client.WithCost(testStream.Procedure, "s", 1)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, url, httpClient := newScripted(t, ok)
			clock := client.NewFakeClock(scriptedTime, true)
			c := scriptedClient(url, httpClient, newInterceptor(t, append([]client.Option{client.WithClock(clock)}, tc.opts...)...))
			for range 3 {
				if err := callUnary(t.Context(), c); err != nil {
					t.Fatal(err)
				}
			}
			if got := clock.Slept(); !reflect.DeepEqual(got, tc.wantSlept) && (len(got) > 0 || len(tc.wantSlept) > 0) {
				t.Fatalf("slept %v, want %v", got, tc.wantSlept)
			}
			if s.count() != 3 {
				t.Fatalf("server saw %d calls", s.count())
			}
		})
	}
}

func TestNewClientInterceptorErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opt  client.Option
	}{
		{"zero attempts", client.WithRetry(0)},
		{"negative max wait", client.WithMaxWait(-time.Second)},
		{"no procedure", client.WithCost("", "s", 1)},
		{"no bucket", client.WithCost(testUnary.Procedure, "", 1)},
		{"negative cost", client.WithCost(testUnary.Procedure, "s", -1)},
		{"infinite cost", client.WithCost(testUnary.Procedure, "s", math.Inf(1))},
		{"NaN cost", client.WithCost(testUnary.Procedure, "s", math.NaN())},
	} {
		if _, err := client.NewClientInterceptor(tc.opt); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
}

// TestBidiBothSidesAtOnce sends and receives on a bidi stream from two
// goroutines at once, as Connect allows, through a paced interceptor: under
// -race, the stream wrapper must not share unguarded state between them.
func TestBidiBothSidesAtOnce(t *testing.T) {
	t.Parallel()
	_, url, httpClient := newScripted(t, ok)
	ic := newInterceptor(t, client.WithCost(testBidi.Procedure, "s", 1))
	c := scriptedClient(url, httpClient, ic)
	for round := range 3 { // the first round learns the state, the others are paced by it
		stream, err := c.CallClientStream(t.Context(), testBidi)
		if err != nil {
			t.Fatal(err)
		}
		const messages = 50
		var wg sync.WaitGroup
		wg.Go(func() {
			for i := range messages {
				if err := stream.Send(wrapperspb.String(strconv.Itoa(i))); err != nil {
					t.Errorf("round %d: send %d: %v", round, i, err)
					return
				}
			}
			_ = stream.CloseSend()
		})
		received := 0
		for {
			var m str
			if err := stream.Receive(&m); err != nil {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("round %d: receive: %v", round, err)
				}
				break
			}
			received++
		}
		wg.Wait()
		_ = stream.Close()
		if received != messages {
			t.Fatalf("round %d: %d messages echoed, want %d", round, received, messages)
		}
	}
	if q, ok := ic.Quota("s"); !ok || q.Remaining != 99 {
		t.Fatalf("quota %+v, %v", q, ok)
	}
}
