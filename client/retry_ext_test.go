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

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/client"
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
	testProc     = "/test.v1.Scripted/Unary"
	testStream   = "/test.v1.Scripted/Stream"
	testBidi     = "/test.v1.Scripted/Bidi"
	scriptedTime = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
)

// scripted is a Connect server whose every call takes the next outcome of
// its script (the last one repeats), with no limiter of its own.
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

func (o outcome) err() error {
	err := connect.NewError(o.code, errors.New("scripted"))
	if !o.noInfo {
		detail, _ := connect.NewErrorDetail(&errdetails.RetryInfo{RetryDelay: durationpb.New(o.retryInfo)})
		err.AddDetail(detail)
	}
	return err
}

func newScripted(t *testing.T, script ...outcome) (*scripted, string, *http.Client) {
	t.Helper()
	s := &scripted{script: script}
	mux := http.NewServeMux()
	mux.Handle(testProc, connect.NewUnaryHandler(testProc, func(context.Context, *connect.Request[str]) (*connect.Response[str], error) {
		if o := s.next(); o.code != 0 {
			return nil, o.err()
		}
		// Bucket "s" holds 2 tokens, refills 1 a second, and is empty.
		res := connect.NewResponse(wrapperspb.String("ok"))
		res.Header().Set(client.HeaderRateLimitPolicy, `"s";q=2;w=2`)
		res.Header().Set(client.HeaderRateLimit, `"s";r=0;t=2`)
		return res, nil
	}))
	mux.Handle(testStream, connect.NewServerStreamHandler(testStream, func(_ context.Context, _ *connect.Request[str], stream *connect.ServerStream[str]) error {
		o := s.next()
		if o.code == 0 || o.afterMsg {
			if err := stream.Send(wrapperspb.String("ok")); err != nil {
				return err
			}
		}
		if o.code != 0 {
			return o.err()
		}
		return nil
	}))
	mux.Handle(testBidi, connect.NewBidiStreamHandler(testBidi, func(_ context.Context, stream *connect.BidiStream[str, str]) error {
		stream.ResponseHeader().Set(client.HeaderRateLimitPolicy, `"s";q=100;w=1`)
		stream.ResponseHeader().Set(client.HeaderRateLimit, `"s";r=99`)
		for {
			m, err := stream.Receive()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			if err := stream.Send(m); err != nil {
				return err
			}
		}
	}))
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	return s, hs.URL, hs.Client()
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
				var err error
				if streaming {
					c := connect.NewClient[str, str](httpClient, url+testStream, connect.WithInterceptors(ic))
					var stream *connect.ServerStreamForClient[str]
					if stream, err = c.CallServerStream(t.Context(), connect.NewRequest(wrapperspb.String("x"))); err == nil {
						for stream.Receive() {
						}
						err = stream.Err()
						_ = stream.Close()
					}
				} else {
					c := connect.NewClient[str, str](httpClient, url+testProc, connect.WithInterceptors(ic))
					_, err = c.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("x")))
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

// TestRetryCanceledOnFakeClock cancels a call while it waits on the fake
// clock: it ends with canceled, and is not sent again.
func TestRetryCanceledOnFakeClock(t *testing.T) {
	t.Parallel()
	s, url, httpClient := newScripted(t, deny(5*time.Second), ok)
	clock := client.NewFakeClock(scriptedTime, false)
	c := connect.NewClient[str, str](httpClient, url+testProc, connect.WithInterceptors(newInterceptor(t, client.WithClock(clock))))
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := c.CallUnary(ctx, connect.NewRequest(wrapperspb.String("x")))
		done <- err
	}()
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
		{"waits for the refill", []client.Option{client.WithCost(testProc, "s", 1)}, []time.Duration{time.Second, time.Second}},
		{"a cost function", []client.Option{client.WithCostFunc(func(procedure string, msg any) []client.Cost {
			if procedure != testProc || msg.(*str).GetValue() != "x" { //nolint:forcetypeassert // one message type here
				t.Errorf("cost of %s %v", procedure, msg)
			}
			return []client.Cost{{Bucket: "s", Tokens: 0.5}, {Bucket: "", Tokens: 9}, {Bucket: "s", Tokens: -1}}
		})}, []time.Duration{500 * time.Millisecond, 500 * time.Millisecond}},
		{"over capacity: no say", []client.Option{client.WithCost(testProc, "s", 3)}, nil},
		{"a wait past the max wait is not started", []client.Option{client.WithCost(testProc, "s", 1), client.WithMaxWait(999 * time.Millisecond)}, nil},
		{"another procedure's cost", []client.Option{client.WithCost(testStream, "s", 1)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, url, httpClient := newScripted(t, ok)
			clock := client.NewFakeClock(scriptedTime, true)
			ic := newInterceptor(t, append([]client.Option{client.WithClock(clock)}, tc.opts...)...)
			c := connect.NewClient[str, str](httpClient, url+testProc, connect.WithInterceptors(ic))
			for range 3 {
				if _, err := c.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("x"))); err != nil {
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

func TestNewInterceptorErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opt  client.Option
	}{
		{"zero attempts", client.WithRetry(0)},
		{"negative max wait", client.WithMaxWait(-time.Second)},
		{"no procedure", client.WithCost("", "s", 1)},
		{"no bucket", client.WithCost(testProc, "", 1)},
		{"negative cost", client.WithCost(testProc, "s", -1)},
		{"infinite cost", client.WithCost(testProc, "s", math.Inf(1))},
		{"NaN cost", client.WithCost(testProc, "s", math.NaN())},
	} {
		if _, err := client.NewInterceptor(tc.opt); err == nil {
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
	ic := newInterceptor(t, client.WithCost(testBidi, "s", 1))
	c := connect.NewClient[str, str](httpClient, url+testBidi, connect.WithInterceptors(ic))
	for round := range 3 { // the first round learns the state, the others are paced by it
		stream := c.CallBidiStream(t.Context())
		const messages = 50
		var wg sync.WaitGroup
		wg.Go(func() {
			for i := range messages {
				if err := stream.Send(wrapperspb.String(strconv.Itoa(i))); err != nil {
					t.Errorf("round %d: send %d: %v", round, i, err)
					return
				}
			}
			_ = stream.CloseRequest()
		})
		received := 0
		for {
			if _, err := stream.Receive(); err != nil {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("round %d: receive: %v", round, err)
				}
				break
			}
			received++
		}
		wg.Wait()
		_ = stream.CloseResponse()
		if received != messages {
			t.Fatalf("round %d: %d messages echoed, want %d", round, received, messages)
		}
	}
	if q, ok := ic.Quota("s"); !ok || q.Remaining != 99 {
		t.Fatalf("quota %+v, %v", q, ok)
	}
}
