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
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/authn"
	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/prototest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
	"github.com/connectlimit/connectlimit/proto/connectlimit/v1/connectlimitv1connect"
)

// The AI test service: Ask (unary) and Report (server stream) reserve an
// estimate of request.max_tokens from "tokens" and settle to the usage the
// response reports; Chat (bidi) charges each message the size of its topic.
// The handlers obey the request's topic:
//
//	use=N         use N tokens (Ask: usage.total_tokens; Report: chunks of 4)
//	slow=N        (Report) use N tokens in chunks of 4, 20ms apart
//	gate,use=N    wait until the test sends on the fixture's gate, then use=N
//	gate=G,use=N  wait until the test sends on the named gate G, then use=N
//	fail          fail before any work
//	report=N      call ReportUsage("tokens", N), then fail
//	wait          (Report) send one chunk of 4, then wait for cancellation
//
// Chat answers each message with its topic's size in tokens; Duplex does
// the same, receiving in one goroutine and sending from another, as Connect
// allows.
const (
	askProc    = "/test.v1.TestService/Ask"
	reportProc = "/test.v1.TestService/Report"
	chatProc   = "/test.v1.TestService/Chat"
	duplexProc = "/test.v1.TestService/Duplex"
)

type msg = dynamicpb.Message

type aiFixture struct {
	// gate releases the calls whose topic starts with "gate,"; gates, by
	// name, those whose topic starts with "gate=NAME,".
	gate  chan struct{}
	gates sync.Map // string → chan struct{}
	// atGate counts the calls that reached a gate, by name ("" for gate).
	atGate sync.Map // string → *atomic.Int64
	cfg    costmap.Config
	clock  *buckettest.Clock
	store  bucket.Store
	ic     *interceptor.Interceptor
	svc    protoreflect.ServiceDescriptor
	server *httptest.Server
	ask    *connect.Client[msg, msg]
	report *connect.Client[msg, msg]
	chat   *connect.Client[msg, msg]
	duplex *connect.Client[msg, msg]
	quota  connectlimitv1connect.QuotaServiceClient
}

func aiService(t testing.TB) protoreflect.ServiceDescriptor {
	t.Helper()
	tokens := func(actual string) *connectlimitv1.Charge {
		return &connectlimitv1.Charge{Bucket: "tokens", Estimate: "request.max_tokens", Actual: actual}
	}
	return prototest.NewService(t,
		prototest.Method{Name: "Ask", Report: true, Limit: &connectlimitv1.Limit{Charges: []*connectlimitv1.Charge{
			{Bucket: "requests", Cost: proto.Float64(1)}, tokens("has(response.usage) ? response.usage.total_tokens : 0"),
		}}},
		prototest.Method{Name: "Report", Report: true, ServerStreaming: true, Limit: &connectlimitv1.Limit{
			Charges:     []*connectlimitv1.Charge{{Bucket: "requests", Cost: proto.Float64(1)}, tokens("response.tokens")},
			Concurrency: "streams",
		}},
		prototest.Method{Name: "Chat", Report: true, ServerStreaming: true, ClientStreaming: true, Limit: &connectlimitv1.Limit{
			Charges: []*connectlimitv1.Charge{{Bucket: "tokens", Estimate: "size(request.topic)"}},
		}},
		prototest.Method{Name: "Duplex", Report: true, ServerStreaming: true, ClientStreaming: true, Limit: &connectlimitv1.Limit{
			Charges: []*connectlimitv1.Charge{{Bucket: "tokens", Estimate: "size(request.topic)"}},
		}},
	)
}

func aiConfig() costmap.Config {
	return costmap.Config{
		Buckets: map[string]costmap.BucketConfig{
			"requests": {Capacity: 1000, RefillPerSecond: 1e-9},
			"tokens":   {Capacity: 1000, RefillPerSecond: 1e-9},
		},
		Concurrency: map[string]costmap.ConcurrencyConfig{"streams": {Limit: 2, Lease: time.Second}},
		Tiers: map[string]costmap.TierConfig{
			"pro": {Scale: 10, Concurrency: map[string]costmap.ConcurrencyConfig{"streams": {Limit: 3}}},
		},
	}
}

// newAIFixture serves the AI test service; store nil means a memstore on
// the fixture's fake clock.
func newAIFixture(t testing.TB, cfg costmap.Config, store bucket.Store, opts ...interceptor.Option) *aiFixture {
	t.Helper()
	f := &aiFixture{gate: make(chan struct{}), cfg: cfg, clock: buckettest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), store: store}
	if f.store == nil {
		ms := memstore.New(memstore.WithClock(f.clock.Now))
		t.Cleanup(func() { _ = ms.Close() })
		f.store = ms
	}
	if !bucket.IsInProcess(f.store) {
		// The default policy decides locally while the store fails.
		local := memstore.New()
		t.Cleanup(func() { _ = local.Close() })
		opts = append([]interceptor.Option{interceptor.WithLocalStore(local)}, opts...)
	}
	f.svc = aiService(t)
	costs, err := costmap.New(cfg, f.svc)
	if err != nil {
		t.Fatal(err)
	}
	// Quiet, and failing closed with a long timeout: a slow store on a
	// busy machine must fail a test loudly, never let calls through
	// uncharged. Tests of the failure policy pass their own options.
	opts = append([]interceptor.Option{
		interceptor.WithLogger(slog.New(slog.DiscardHandler)),
		interceptor.WithFailurePolicy(interceptor.FailClosed),
		interceptor.WithStoreTimeout(10 * time.Second),
	}, opts...)
	f.ic, err = interceptor.NewInterceptor(f.store, costs, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.ic.Close(context.Background()) })
	methods := f.svc.Methods()
	in := f.svc.ParentFile().Messages().ByName("ReportRequest")
	out := f.svc.ParentFile().Messages().ByName("ReportResponse")
	initRequest := connect.WithRequestInitializer(func(_ connect.Spec, m any) error {
		*m.(*msg) = *dynamicpb.NewMessage(in) //nolint:forcetypeassert // only *msg here
		return nil
	})
	mux := http.NewServeMux()
	mux.Handle(askProc, connect.NewUnaryHandler(askProc, func(ctx context.Context, r *connect.Request[msg]) (*connect.Response[msg], error) {
		use, err := f.obey(ctx, r.Msg)
		if err != nil {
			return nil, err
		}
		return connect.NewResponse(prototest.ReportResponse(f.svc, 0, int32(use))), nil
	}, connect.WithSchema(methods.ByName("Ask")), f.ic.HandlerOptions(), initRequest))
	mux.Handle(reportProc, connect.NewServerStreamHandler(reportProc, func(ctx context.Context, r *connect.Request[msg], s *connect.ServerStream[msg]) error {
		topic := topicOf(r.Msg)
		if topic == "wait" {
			if err := s.Send(prototest.ReportResponse(f.svc, 4, 0)); err != nil {
				return err
			}
			<-ctx.Done()
			return ctx.Err()
		}
		if n, ok := strings.CutPrefix(topic, "fail-after="); ok {
			chunks, _ := strconv.Atoi(n)
			for range chunks {
				if err := s.Send(prototest.ReportResponse(f.svc, 4, 0)); err != nil {
					return err
				}
			}
			return connect.NewError(connect.CodeInternal, errors.New("model crashed"))
		}
		var pause time.Duration
		if n, ok := strings.CutPrefix(topic, "slow="); ok {
			r.Msg.Set(r.Msg.Descriptor().Fields().ByName("topic"), protoreflect.ValueOfString("use="+n))
			pause = 20 * time.Millisecond
		}
		use, err := f.obey(ctx, r.Msg)
		if err != nil {
			return err
		}
		for sent := 0; sent < use; sent += 4 {
			if sent > 0 && pause > 0 {
				time.Sleep(pause)
			}
			if err := s.Send(prototest.ReportResponse(f.svc, int32(min(4, use-sent)), 0)); err != nil {
				return err
			}
		}
		return nil
	}, connect.WithSchema(methods.ByName("Report")), f.ic.HandlerOptions(), initRequest))
	mux.Handle(chatProc, connect.NewBidiStreamHandler(chatProc, func(_ context.Context, s *connect.BidiStream[msg, msg]) error {
		for {
			m, err := s.Receive()
			if err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
			if err := s.Send(prototest.ReportResponse(f.svc, int32(len(topicOf(m))), 0)); err != nil {
				return err
			}
		}
	}, connect.WithSchema(methods.ByName("Chat")), f.ic.HandlerOptions(), initRequest))
	mux.Handle(duplexProc, connect.NewBidiStreamHandler(duplexProc, func(ctx context.Context, s *connect.BidiStream[msg, msg]) error {
		// Receive and Send run in two goroutines at once.
		received := make(chan *msg)
		errc := make(chan error, 1)
		go func() {
			defer close(received)
			for {
				m, err := s.Receive()
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
			if err := s.Send(prototest.ReportResponse(f.svc, int32(len(topicOf(m))), 0)); err != nil {
				return err
			}
		}
		select {
		case err := <-errc:
			return err
		default:
			return nil
		}
	}, connect.WithSchema(methods.ByName("Duplex")), f.ic.HandlerOptions(), initRequest))
	mux.Handle(f.ic.NewQuotaHandler())
	auth := authn.NewMiddleware(func(_ context.Context, r authn.Request) (any, error) {
		if tier, user, ok := strings.Cut(r.Header().Get("X-Test-Identity"), ":"); ok {
			return interceptor.Identity{User: user, Tier: tier}, nil
		}
		return nil, nil //nolint:nilnil // anonymous
	})
	f.server = httptest.NewUnstartedServer(auth.Wrap(mux))
	f.server.EnableHTTP2 = true
	f.server.StartTLS()
	t.Cleanup(f.server.Close)
	initResponse := connect.WithResponseInitializer(func(_ connect.Spec, m any) error {
		*m.(*msg) = *dynamicpb.NewMessage(out) //nolint:forcetypeassert // only *msg here
		return nil
	})
	f.ask = connect.NewClient[msg, msg](f.server.Client(), f.server.URL+askProc, initResponse)
	f.report = connect.NewClient[msg, msg](f.server.Client(), f.server.URL+reportProc, initResponse)
	f.chat = connect.NewClient[msg, msg](f.server.Client(), f.server.URL+chatProc, initResponse)
	f.duplex = connect.NewClient[msg, msg](f.server.Client(), f.server.URL+duplexProc, initResponse)
	f.quota = connectlimitv1connect.NewQuotaServiceClient(f.server.Client(), f.server.URL)
	return f
}

func topicOf(m *msg) string {
	return m.Get(m.Descriptor().Fields().ByName("topic")).String()
}

// obey carries out the topic's instructions for Ask and Report.
func (f *aiFixture) obey(ctx context.Context, m *msg) (int, error) {
	topic := topicOf(m)
	if rest, ok := strings.CutPrefix(topic, "gate"); ok {
		gate, name := f.gate, ""
		if named, ok := strings.CutPrefix(rest, "="); ok {
			name, rest, _ = strings.Cut(named, ",")
			gate = f.namedGate(name)
		} else {
			rest = strings.TrimPrefix(rest, ",")
		}
		f.arrivals(name).Add(1)
		select {
		case <-gate:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		topic = rest
	}
	switch {
	case topic == "fail":
		return 0, connect.NewError(connect.CodeFailedPrecondition, errors.New("bad topic"))
	case strings.HasPrefix(topic, "report="):
		n, _ := strconv.ParseFloat(strings.TrimPrefix(topic, "report="), 64)
		if err := interceptor.ReportUsage(ctx, "tokens", n); err != nil {
			return 0, err
		}
		return 0, connect.NewError(connect.CodeUnavailable, errors.New("model failed after some work"))
	case strings.HasPrefix(topic, "use="):
		return strconv.Atoi(strings.TrimPrefix(topic, "use="))
	}
	return 0, nil
}

// arrivals counts the calls that reached the gate named name ("" for the
// fixture's gate): they reserved, and their handler runs.
func (f *aiFixture) arrivals(name string) *atomic.Int64 {
	n, _ := f.atGate.LoadOrStore(name, new(atomic.Int64))
	return n.(*atomic.Int64) //nolint:forcetypeassert // only counters are stored
}

// namedGate returns the gate named name; closing it releases every call
// waiting on it.
func (f *aiFixture) namedGate(name string) chan struct{} {
	g, _ := f.gates.LoadOrStore(name, make(chan struct{}))
	return g.(chan struct{}) //nolint:forcetypeassert // only channels are stored
}

func (f *aiFixture) request(topic string, maxTokens int32) *connect.Request[msg] {
	return connect.NewRequest(prototest.ReportRequest(f.svc, topic, maxTokens))
}

// levels reads the subject's buckets without charging them.
func (f *aiFixture) levels(t *testing.T, subject string) (requests, tokens float64) {
	t.Helper()
	d, err := f.store.Take(t.Context(), bucket.Request{Subject: subject, Charges: []bucket.Charge{
		{Bucket: "requests", Limit: mustLimit(t, f.cfg.Buckets["requests"])},
		{Bucket: "tokens", Limit: mustLimit(t, f.cfg.Buckets["tokens"])},
	}})
	if err != nil {
		t.Fatal(err)
	}
	return d.Buckets[0].Remaining, d.Buckets[1].Remaining
}

func mustLimit(t *testing.T, bc costmap.BucketConfig) bucket.Limit {
	t.Helper()
	l, err := bucket.NewLimit(bc.Capacity, bc.RefillPerSecond)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func near(a, b float64) bool { return a-b < 1e-6 && b-a < 1e-6 }

type costmapBucket = costmap.BucketConfig

func contains(s, sub string) bool { return strings.Contains(s, sub) }

type http_Header = http.Header

func prototestReq(f *aiFixture, topic string) *msg { return prototest.ReportRequest(f.svc, topic, 0) }
