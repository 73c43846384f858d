package client_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/client"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/prototest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

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

// server is a real Connect server (HTTP/2 over TLS) with connectlimit's
// interceptor installed, on a memstore on the real clock.
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
	limiter, err := interceptor.NewInterceptor(store, costs, interceptor.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = limiter.Close(context.Background()) })
	opts := []connect.HandlerOption{connect.WithInterceptors(counter{s}, limiter)}
	in := s.svc.ParentFile().Messages().ByName("ReportRequest")
	initRequest := connect.WithRequestInitializer(func(_ connect.Spec, m any) error {
		if m, ok := m.(*msg); ok {
			*m = *dynamicpb.NewMessage(in)
		}
		return nil
	})
	methods := s.svc.Methods()
	mux := http.NewServeMux()
	mux.Handle(searchProc, connect.NewUnaryHandler(searchProc,
		func(_ context.Context, r *connect.Request[str]) (*connect.Response[str], error) {
			return connect.NewResponse(wrapperspb.String("found " + r.Msg.GetValue())), nil
		}, append(opts, connect.WithSchema(methods.ByName("Search")))...))
	mux.Handle(reportProc, connect.NewServerStreamHandler(reportProc,
		func(ctx context.Context, r *connect.Request[msg], stream *connect.ServerStream[msg]) error {
			topic := r.Msg.Get(r.Msg.Descriptor().Fields().ByName("topic")).String()
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
		}, append(opts, connect.WithSchema(methods.ByName("Report")), initRequest)...))
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	s.url, s.httpClient = hs.URL, hs.Client()
	return s
}

// clients returns Search and Report clients of s through ic (none if nil).
func (s *server) clients(ic *client.Interceptor, opts ...connect.ClientOption) (*connect.Client[str, str], *connect.Client[msg, msg]) {
	if ic != nil {
		opts = append(opts, connect.WithInterceptors(ic))
	}
	out := s.svc.ParentFile().Messages().ByName("ReportResponse")
	initResponse := connect.WithResponseInitializer(func(_ connect.Spec, m any) error {
		if m, ok := m.(*msg); ok {
			*m = *dynamicpb.NewMessage(out)
		}
		return nil
	})
	return connect.NewClient[str, str](s.httpClient, s.url+searchProc, opts...),
		connect.NewClient[msg, msg](s.httpClient, s.url+reportProc, append(opts, initResponse)...)
}

// report runs a Report to its end and returns the messages received and
// the error that ended it, if any.
func (s *server) report(ctx context.Context, c *connect.Client[msg, msg], topic string, maxTokens int32) (int, error) {
	stream, err := c.CallServerStream(ctx, connect.NewRequest(prototest.ReportRequest(s.svc, topic, maxTokens)))
	if err != nil {
		return 0, err
	}
	defer stream.Close()
	n := 0
	for stream.Receive() {
		n++
	}
	return n, stream.Err()
}

// counter counts the calls that reach the server and the denials it
// answers; installed before connectlimit's interceptor, it sees both.
type counter struct{ s *server }

func (c counter) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		c.s.calls.Add(1)
		res, err := next(ctx, req)
		c.count(err)
		return res, err
	}
}

func (c counter) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (c counter) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		c.s.calls.Add(1)
		err := next(ctx, conn)
		c.count(err)
		return err
	}
}

func (c counter) count(err error) {
	if connect.CodeOf(err) == connect.CodeResourceExhausted {
		c.s.denials.Add(1)
	}
}

// protocols are the client options for each protocol a Connect server
// speaks.
var protocols = []struct {
	name string
	opts []connect.ClientOption
}{
	{name: "connect"},
	{name: "grpc", opts: []connect.ClientOption{connect.WithGRPC()}},
	{name: "grpcweb", opts: []connect.ClientOption{connect.WithGRPCWeb()}},
}

// newInterceptor returns a client interceptor or fails the test.
func newInterceptor(t testing.TB, opts ...client.Option) *client.Interceptor {
	t.Helper()
	ic, err := client.NewInterceptor(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return ic
}
