package interceptor_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	connectv1 "connectrpc.com/connect"
	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/costmap"
	interceptorv1 "github.com/connectlimit/connectlimit/interceptor"
	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
	"github.com/connectlimit/connectlimit/internal/prototest"
	"github.com/connectlimit/connectlimit/limiter"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
	"github.com/connectlimit/connectlimit/proto/connectlimit/v1/connectlimitv1connect"
)

// The test service, served the same way by connect-go v1 handlers behind
// the v1 adapter and by connect-go v2 handlers behind the v2 adapter:
//
//	Search (unary, StringValue)   1 "search" token
//	Ask (unary)                   1 "requests" token; reserves request.max_tokens "tokens",
//	                              settled to usage.total_tokens of the response
//	Report (server stream)        1 "requests" token; reserves request.max_tokens "tokens",
//	                              settled to the tokens of the messages sent;
//	                              at most one at once per caller ("streams")
//	Upload (client stream)        1 "msgs" token per message
//	Chat (bidi)                   size(request.topic) "tokens" per message
//	Duplex (bidi)                 as Chat, receiving and sending in two goroutines at once
//
// The handlers obey the request's topic:
//
//	use=N        Ask: answer usage.total_tokens N; Report: send N tokens in messages of 4
//	report=N     Ask: ReportUsage("tokens", N), answer usage 0
//	hold         Report: send one message of 4 tokens, then wait for the call to end
//	flush,use=N  Report: flush the headers (v2 SendHeaders), then use=N
//
// With X-Test-Flush set, the v2 Chat flushes its headers before it
// receives anything.
//
// Callers are anonymous (ip:127.0.0.1) unless they send X-Test-User, read
// by an identity function of each major's flavour.
const (
	searchProc = "/test.v1.TestService/Search"
	askProc    = "/test.v1.TestService/Ask"
	reportProc = "/test.v1.TestService/Report"
	uploadProc = "/test.v1.TestService/Upload"
	chatProc   = "/test.v1.TestService/Chat"
	duplexProc = "/test.v1.TestService/Duplex"
	userHeader = "X-Test-User"
)

type (
	str = wrapperspb.StringValue
	msg = dynamicpb.Message
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func testService(tb testing.TB) protoreflect.ServiceDescriptor {
	tb.Helper()
	tokens := func(actual string) *connectlimitv1.Charge {
		return &connectlimitv1.Charge{Bucket: "tokens", Estimate: "request.max_tokens", Actual: actual}
	}
	one := func(bucketName string) *connectlimitv1.Charge {
		return &connectlimitv1.Charge{Bucket: bucketName, Cost: proto.Float64(1)}
	}
	return prototest.NewService(tb,
		prototest.Method{Name: "Search", Limit: prototest.Limit("search", nil)},
		prototest.Method{Name: "Ask", Report: true, Limit: &connectlimitv1.Limit{Charges: []*connectlimitv1.Charge{
			one("requests"), tokens("has(response.usage) ? response.usage.total_tokens : 0"),
		}}},
		prototest.Method{Name: "Report", Report: true, ServerStreaming: true, Limit: &connectlimitv1.Limit{
			Charges:     []*connectlimitv1.Charge{one("requests"), tokens("response.tokens")},
			Concurrency: "streams",
		}},
		prototest.Method{Name: "Upload", Report: true, ClientStreaming: true, Limit: &connectlimitv1.Limit{
			Charges: []*connectlimitv1.Charge{one("msgs")},
		}},
		prototest.Method{Name: "Chat", Report: true, ClientStreaming: true, ServerStreaming: true, Limit: &connectlimitv1.Limit{
			Charges: []*connectlimitv1.Charge{{Bucket: "tokens", Estimate: "size(request.topic)"}},
		}},
		prototest.Method{Name: "Duplex", Report: true, ClientStreaming: true, ServerStreaming: true, Limit: &connectlimitv1.Limit{
			Charges: []*connectlimitv1.Charge{{Bucket: "tokens", Estimate: "size(request.topic)"}},
		}},
	)
}

// testConfig is the limits of the test service: search refills a token a
// second; the others do not refill within a test.
func testConfig() costmap.Config {
	return costmap.Config{
		Buckets: map[string]costmap.BucketConfig{
			"search":   {Capacity: 3, RefillPerSecond: 1},
			"requests": {Capacity: 1000, RefillPerSecond: 1e-9},
			"tokens":   {Capacity: 1000, RefillPerSecond: 1e-9},
			"msgs":     {Capacity: 3, RefillPerSecond: 1e-9},
		},
		Concurrency: map[string]costmap.ConcurrencyConfig{"streams": {Limit: 1, Lease: 10 * time.Second}},
	}
}

// setup is how a test wants its target built.
type setup struct {
	cfg costmap.Config
	// store is where buckets live; nil means a memstore on the target's
	// fake clock.
	store bucket.Store
	// policy is the failure policy; the default, FailClosed with a long
	// store timeout, makes a slow store fail a test, never let calls
	// through uncharged.
	policy  limiter.FailurePolicy
	timeout time.Duration
	// local is the local store of FailLocal.
	local bucket.Store
}

// target is the test service on one connect-go major, on a real HTTP/2
// server, with what tests need to call it and to look at its buckets.
type target struct {
	major string
	svc   protoreflect.ServiceDescriptor
	cfg   costmap.Config
	clock *buckettest.Clock
	store bucket.Store
	lim   *limiter.Limiter
	url   string
	http  *http.Client
}

// major builds the test service on one major.
type major struct {
	name  string
	start func(t *testing.T, s setup) *target
}

// majors are the two adapters under test.
var majors = []major{{"v1", startV1}, {"v2", startV2}}

// newTarget does what both majors share, up to the limiter's options.
func newTarget(t *testing.T, name string, s setup) (*target, *costmap.Map) {
	t.Helper()
	if s.cfg.Buckets == nil {
		s.cfg = testConfig()
	}
	tg := &target{major: name, cfg: s.cfg, clock: buckettest.NewClock(t0), store: s.store, svc: testService(t)}
	if tg.store == nil {
		ms := memstore.New(memstore.WithClock(tg.clock.Now))
		t.Cleanup(func() { _ = ms.Close() })
		tg.store = ms
	}
	costs, err := costmap.New(s.cfg, tg.svc, connectlimitv1.File_connectlimit_v1_quota_proto.Services().Get(0))
	if err != nil {
		t.Fatal(err)
	}
	return tg, costs
}

// timeoutOr is the setup's store timeout, 10s by default.
func (s setup) timeoutOr() time.Duration {
	if s.timeout == 0 {
		return 10 * time.Second
	}
	return s.timeout
}

func (tg *target) serve(t *testing.T, h http.Handler) {
	t.Helper()
	hs := httptest.NewUnstartedServer(h)
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	tg.url, tg.http = hs.URL, hs.Client()
}

// startV1 serves the test service with connect-go v1 behind
// interceptor.NewInterceptor.
func startV1(t *testing.T, s setup) *target {
	t.Helper()
	tg, costs := newTarget(t, "v1", s)
	opts := []interceptorv1.Option{
		interceptorv1.WithLogger(slog.New(slog.DiscardHandler)),
		interceptorv1.WithFailurePolicy(orClosed(s.policy, s)),
		interceptorv1.WithStoreTimeout(s.timeoutOr()),
		interceptorv1.WithIdentityFunc(func(_ context.Context, _ connectv1.Peer, h http.Header) (interceptorv1.Identity, error) {
			return interceptorv1.Identity{User: h.Get(userHeader)}, nil
		}),
	}
	if s.local != nil {
		opts = append(opts, interceptorv1.WithLocalStore(s.local))
	}
	ic, err := interceptorv1.NewInterceptor(tg.store, costs, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ic.Close(context.Background()) })
	tg.lim = ic.Limiter()
	tg.serve(t, v1Handlers(tg.svc, ic.HandlerOptions(), ic))
	return tg
}

// orClosed is the setup's policy: FailClosed unless it names another
// (FailLocal, the zero value, only with a local store).
func orClosed(p limiter.FailurePolicy, s setup) limiter.FailurePolicy {
	if p == limiter.FailLocal && s.local == nil {
		return limiter.FailClosed
	}
	return p
}

// v1Handlers returns the test service's connect-go v1 handlers, built
// with opts, and ic's quota handler.
func v1Handlers(svc protoreflect.ServiceDescriptor, opts connectv1.HandlerOption, ic *interceptorv1.Interceptor) http.Handler {
	methods := svc.Methods()
	in := svc.ParentFile().Messages().ByName("ReportRequest")
	initRequest := connectv1.WithRequestInitializer(func(_ connectv1.Spec, m any) error {
		if m, ok := m.(*msg); ok {
			*m = *dynamicpb.NewMessage(in)
		}
		return nil
	})
	h := handlers{svc: svc, reportUsage: interceptorv1.ReportUsage}
	schema := func(name protoreflect.Name) connectv1.HandlerOption {
		return connectv1.WithHandlerOptions(opts, initRequest, connectv1.WithSchema(methods.ByName(name)))
	}
	mux := http.NewServeMux()
	mux.Handle(searchProc, connectv1.NewUnaryHandler(searchProc, func(_ context.Context, r *connectv1.Request[str]) (*connectv1.Response[str], error) {
		return connectv1.NewResponse(h.search(r.Msg)), nil
	}, schema("Search")))
	mux.Handle(askProc, connectv1.NewUnaryHandler(askProc, func(ctx context.Context, r *connectv1.Request[msg]) (*connectv1.Response[msg], error) {
		res, err := h.ask(ctx, r.Msg)
		if err != nil {
			return nil, err
		}
		return connectv1.NewResponse(res), nil
	}, schema("Ask")))
	mux.Handle(reportProc, connectv1.NewServerStreamHandler(reportProc, func(ctx context.Context, r *connectv1.Request[msg], s *connectv1.ServerStream[msg]) error {
		// v1 cannot flush headers without a message: flush is a no-op.
		return h.report(ctx, r.Msg, s.Send, func() error { return nil })
	}, schema("Report")))
	mux.Handle(uploadProc, connectv1.NewClientStreamHandler(uploadProc, func(ctx context.Context, s *connectv1.ClientStream[msg]) (*connectv1.Response[msg], error) {
		res, err := h.upload(ctx, func() (*msg, error) {
			if !s.Receive() {
				if err := s.Err(); err != nil {
					return nil, err
				}
				return nil, io.EOF
			}
			return s.Msg(), nil
		})
		if err != nil {
			return nil, err
		}
		return connectv1.NewResponse(res), nil
	}, schema("Upload")))
	mux.Handle(chatProc, connectv1.NewBidiStreamHandler(chatProc, func(ctx context.Context, s *connectv1.BidiStream[msg, msg]) error {
		return h.chat(ctx, s.Receive, s.Send)
	}, schema("Chat")))
	mux.Handle(duplexProc, connectv1.NewBidiStreamHandler(duplexProc, func(ctx context.Context, s *connectv1.BidiStream[msg, msg]) error {
		return h.duplex(ctx, s.Receive, s.Send)
	}, schema("Duplex")))
	if ic != nil {
		mux.Handle(ic.NewQuotaHandler(opts))
	}
	return mux
}

// startV2 serves the test service with connect-go v2 behind
// interceptor/v2's NewServerInterceptor.
func startV2(t *testing.T, s setup) *target {
	t.Helper()
	tg, costs := newTarget(t, "v2", s)
	opts := []interceptor.Option{
		interceptor.WithLogger(slog.New(slog.DiscardHandler)),
		interceptor.WithFailurePolicy(orClosed(s.policy, s)),
		interceptor.WithStoreTimeout(s.timeoutOr()),
		interceptor.WithIdentityFunc(func(_ context.Context, call *connect.CallInfo) (interceptor.Identity, error) {
			return interceptor.Identity{User: call.RequestHeader().Get(userHeader)}, nil
		}),
	}
	if s.local != nil {
		opts = append(opts, interceptor.WithLocalStore(s.local))
	}
	limit, lim, err := interceptor.NewServerInterceptor(tg.store, costs, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lim.Close(context.Background()) })
	tg.lim = lim
	tg.serve(t, v2Handlers(tg.svc, lim, limit))
	return tg
}

// v2Handlers returns the test service's connect-go v2 handlers behind
// interceptors, with the quota service of lim (if not nil).
func v2Handlers(svc protoreflect.ServiceDescriptor, lim *limiter.Limiter, interceptors ...connect.ServerInterceptor) http.Handler {
	methods := svc.Methods()
	in := svc.ParentFile().Messages().ByName("ReportRequest")
	h := handlers{svc: svc, reportUsage: interceptor.ReportUsage}
	spec := func(name protoreflect.Name) connect.Spec {
		md := methods.ByName(name)
		st := connect.StreamTypeUnary
		if md.IsStreamingClient() {
			st |= connect.StreamTypeClient
		}
		if md.IsStreamingServer() {
			st |= connect.StreamTypeServer
		}
		return connect.Spec{Procedure: "/test.v1.TestService/" + string(name), Schema: md, StreamType: st}
	}
	receive := func(stream connect.ServerStream) func() (*msg, error) {
		return func() (*msg, error) {
			m := dynamicpb.NewMessage(in)
			if err := stream.Receive(m); err != nil {
				return nil, err
			}
			return m, nil
		}
	}
	server := connect.NewServer(interceptors...)
	server.Register(
		connect.Method{Spec: spec("Search"), Handler: func(_ context.Context, _ connect.Spec, stream connect.ServerStream) error {
			var req str
			if err := stream.Receive(&req); err != nil {
				return err
			}
			return stream.Send(h.search(&req))
		}},
		connect.Method{Spec: spec("Ask"), Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			req, err := receive(stream)()
			if err != nil {
				return err
			}
			res, err := h.ask(ctx, req)
			if err != nil {
				return err
			}
			return stream.Send(res)
		}},
		connect.Method{Spec: spec("Report"), Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			req, err := receive(stream)()
			if err != nil {
				return err
			}
			return h.report(ctx, req, func(m *msg) error { return stream.Send(m) }, stream.SendHeaders)
		}},
		connect.Method{Spec: spec("Upload"), Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			res, err := h.upload(ctx, receive(stream))
			if err != nil {
				return err
			}
			return stream.Send(res)
		}},
		connect.Method{Spec: spec("Chat"), Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			if info, _ := connect.CallInfoForServerContext(ctx); info.RequestHeader().Get("X-Test-Flush") != "" {
				if err := stream.SendHeaders(); err != nil {
					return err
				}
			}
			return h.chat(ctx, receive(stream), func(m *msg) error { return stream.Send(m) })
		}},
		connect.Method{Spec: spec("Duplex"), Handler: func(ctx context.Context, _ connect.Spec, stream connect.ServerStream) error {
			return h.duplex(ctx, receive(stream), func(m *msg) error { return stream.Send(m) })
		}},
	)
	if lim != nil {
		interceptor.RegisterQuotaService(server, lim)
	}
	mux := http.NewServeMux()
	connecthttp.Mount(mux, server)
	return mux
}

// handlers is the test service's logic, shared by both majors.
type handlers struct {
	svc         protoreflect.ServiceDescriptor
	reportUsage func(ctx context.Context, bucketName string, tokens float64) error
}

func topicOf(m *msg) string { return m.Get(m.Descriptor().Fields().ByName("topic")).String() }

func tokensOf(m *msg) int { return int(m.Get(m.Descriptor().Fields().ByName("tokens")).Int()) }

func (h handlers) search(req *str) *str { return wrapperspb.String("found " + req.GetValue()) }

func (h handlers) ask(ctx context.Context, req *msg) (*msg, error) {
	topic := topicOf(req)
	if n, ok := strings.CutPrefix(topic, "report="); ok {
		tokens, _ := strconv.ParseFloat(n, 64)
		if err := h.reportUsage(ctx, "tokens", tokens); err != nil {
			return nil, err
		}
		return prototest.ReportResponse(h.svc, 0, 0), nil
	}
	use, _ := strconv.Atoi(strings.TrimPrefix(topic, "use="))
	return prototest.ReportResponse(h.svc, 0, int32(use)), nil
}

func (h handlers) report(ctx context.Context, req *msg, send func(*msg) error, flush func() error) error {
	topic := topicOf(req)
	if topic == "hold" {
		if err := send(prototest.ReportResponse(h.svc, 4, 0)); err != nil {
			return err
		}
		<-ctx.Done()
		return ctx.Err()
	}
	if rest, ok := strings.CutPrefix(topic, "flush,"); ok {
		if err := flush(); err != nil {
			return err
		}
		topic = rest
	}
	use, _ := strconv.Atoi(strings.TrimPrefix(topic, "use="))
	for sent := 0; sent < use; sent += 4 {
		if err := send(prototest.ReportResponse(h.svc, int32(min(4, use-sent)), 0)); err != nil {
			return err
		}
	}
	return nil
}

func (h handlers) upload(_ context.Context, receive func() (*msg, error)) (*msg, error) {
	n := 0
	for {
		if _, err := receive(); err != nil {
			if errors.Is(err, io.EOF) {
				return prototest.ReportResponse(h.svc, int32(n), 0), nil
			}
			return nil, err
		}
		n++
	}
}

func (h handlers) chat(_ context.Context, receive func() (*msg, error), send func(*msg) error) error {
	for {
		m, err := receive()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := send(prototest.ReportResponse(h.svc, int32(len(topicOf(m))), 0)); err != nil {
			return err
		}
	}
}

// duplex is chat with Receive in one goroutine and Send in another, as
// Connect allows.
func (h handlers) duplex(ctx context.Context, receive func() (*msg, error), send func(*msg) error) error {
	received := make(chan *msg)
	errc := make(chan error, 1)
	go func() {
		defer close(received)
		for {
			m, err := receive()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					errc <- err
				}
				return
			}
			select {
			case received <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	for m := range received {
		if err := send(prototest.ReportResponse(h.svc, int32(len(topicOf(m))), 0)); err != nil {
			// Drain, so that the receiving goroutine ends with the call.
			for range received {
			}
			return err
		}
	}
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// Clients: connect-go v1 clients over HTTP, for both majors (the wire is
// the same), in the protocol that opts select.

func (tg *target) request(topic string, maxTokens int32, user string) *connectv1.Request[msg] {
	r := connectv1.NewRequest(prototest.ReportRequest(tg.svc, topic, maxTokens))
	if user != "" {
		r.Header().Set(userHeader, user)
	}
	return r
}

// message is a stream message with topic.
func (tg *target) message(topic string) *msg {
	return prototest.ReportRequest(tg.svc, topic, 0)
}

func (tg *target) msgClient(proc string, opts ...connectv1.ClientOption) *connectv1.Client[msg, msg] {
	out := tg.svc.ParentFile().Messages().ByName("ReportResponse")
	initResponse := connectv1.WithResponseInitializer(func(_ connectv1.Spec, m any) error {
		if m, ok := m.(*msg); ok {
			*m = *dynamicpb.NewMessage(out)
		}
		return nil
	})
	return connectv1.NewClient[msg, msg](tg.http, tg.url+proc, append(opts, initResponse)...)
}

// search calls Search as user (anonymous if empty).
func (tg *target) search(ctx context.Context, user string, opts ...connectv1.ClientOption) (*connectv1.Response[str], error) {
	r := connectv1.NewRequest(wrapperspb.String("q"))
	if user != "" {
		r.Header().Set(userHeader, user)
	}
	return connectv1.NewClient[str, str](tg.http, tg.url+searchProc, opts...).CallUnary(ctx, r)
}

// ask calls Ask.
func (tg *target) ask(ctx context.Context, topic string, maxTokens int32, user string) (*connectv1.Response[msg], error) {
	return tg.msgClient(askProc).CallUnary(ctx, tg.request(topic, maxTokens, user))
}

// report runs a Report to its end and returns the tokens received, the
// response headers and the error that ended it.
func (tg *target) report(ctx context.Context, topic string, maxTokens int32, user string, opts ...connectv1.ClientOption) (int, http.Header, error) {
	stream, err := tg.msgClient(reportProc, opts...).CallServerStream(ctx, tg.request(topic, maxTokens, user))
	if err != nil {
		return 0, nil, err
	}
	defer stream.Close()
	got := 0
	for stream.Receive() {
		got += tokensOf(stream.Msg())
	}
	return got, stream.ResponseHeader(), stream.Err()
}

// quota asks the target's QuotaService for user's buckets.
func (tg *target) quota(ctx context.Context, user string) (*connectlimitv1.GetQuotaResponse, error) {
	r := connectv1.NewRequest(&connectlimitv1.GetQuotaRequest{})
	if user != "" {
		r.Header().Set(userHeader, user)
	}
	res, err := connectlimitv1connect.NewQuotaServiceClient(tg.http, tg.url).GetQuota(ctx, r)
	if err != nil {
		return nil, err
	}
	return res.Msg, nil
}

// levels reads subject's buckets from the store without charging them.
func (tg *target) levels(t *testing.T, subject string, names ...string) map[string]float64 {
	t.Helper()
	tier, err := mustCosts(t, tg).Tier("", true)
	if err != nil {
		t.Fatal(err)
	}
	var charges []bucket.Charge
	for _, name := range names {
		l, _ := tier.Limit(name)
		charges = append(charges, bucket.Charge{Bucket: name, Limit: l})
	}
	d, err := tg.store.Take(t.Context(), bucket.Request{Subject: subject, Charges: charges})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, b := range d.Buckets {
		out[b.Bucket] = b.Remaining
	}
	return out
}

func mustCosts(t *testing.T, tg *target) *costmap.Map {
	t.Helper()
	costs, err := costmap.New(tg.cfg, tg.svc)
	if err != nil {
		t.Fatal(err)
	}
	return costs
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

func near(a, b float64) bool { return a-b < 1e-6 && b-a < 1e-6 }
