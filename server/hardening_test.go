package server_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/internal/prototest"
	"github.com/connectlimit/connectlimit/internal/redistest"
	"github.com/connectlimit/connectlimit/server"
)

// TestAuthFailuresAreLimited tries API keys from one address: after its
// burst of failures the address gets resource_exhausted with a RetryInfo,
// even with a valid key (so keys cannot be guessed by trying many), and a
// second server sharing the Redis knows it at its first failure.
func TestAuthFailuresAreLimited(t *testing.T) {
	t.Parallel()
	const yaml = validYAML + "auth_failures: { capacity: 3, period: 1h }\n"
	rs := redistest.Start(t)
	newURL := func() string { return serveYAML(t, yaml, server.WithRedisURL("redis://"+rs.Addr()+"/0")) }
	first, second := newURL(), newURL()
	call := func(url, auth string) error {
		client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](http.DefaultClient, url)
		req := connect.NewRequest(wrapperspb.String("q"))
		req.Header().Set("Authorization", auth)
		_, err := client.CallUnary(t.Context(), req)
		return err
	}
	for i, auth := range []string{"Bearer guess-1", "Bearer guess-2", "Token guess-3"} {
		if err := call(first, auth); connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Fatalf("failure %d: %v, want unauthenticated", i, err)
		}
	}
	for _, tc := range []struct{ name, url, auth string }{
		{"fourth failure", first, "Bearer guess-4"},
		{"valid key from the same address", first, "Bearer secret-key-1"},
		{"first failure on another server", second, "Bearer guess-5"},
		{"valid key on the other server", second, "Bearer secret-key-1"},
	} {
		err := call(tc.url, tc.auth)
		var ce *connect.Error
		if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
			t.Fatalf("%s: %v, want resource_exhausted", tc.name, err)
		}
		if ra, _ := strconv.Atoi(ce.Meta().Get("Retry-After")); ra < 60 {
			t.Errorf("%s: Retry-After %q, want the minutes until a failure is forgiven", tc.name, ce.Meta().Get("Retry-After"))
		}
		var retry *errdetails.RetryInfo
		for _, d := range ce.Details() {
			if v, derr := d.Value(); derr == nil {
				if ri, ok := v.(*errdetails.RetryInfo); ok {
					retry = ri
				}
			}
		}
		if retry.GetRetryDelay().AsDuration() < time.Minute {
			t.Errorf("%s: RetryInfo %v, want about 20 minutes", tc.name, retry)
		}
	}
	// Anonymous calls do not authenticate, so they are not refused.
	if err := call(first, ""); err != nil && connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("anonymous: %v", err)
	}
}

func TestBearerSchemeIsCaseInsensitive(t *testing.T) {
	t.Parallel()
	client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](http.DefaultClient, serveYAML(t, validYAML))
	for _, auth := range []string{"bearer secret-key-1", "BEARER secret-key-1"} {
		req := connect.NewRequest(wrapperspb.String("q"))
		req.Header().Set("Authorization", auth)
		if _, err := client.CallUnary(t.Context(), req); err != nil {
			t.Fatalf("%q: %v", auth, err)
		}
	}
}

// countingReader counts the bytes read from it.
type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// TestRequestSizeIsLimited sends a unary request far larger than the
// default limit of 4 MiB: it is refused without the server reading it.
func TestRequestSizeIsLimited(t *testing.T) {
	t.Parallel()
	url := serveYAML(t, validYAML)
	client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](http.DefaultClient, url)
	// Just under the limit: read, and allowed.
	if _, err := client.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String(strings.Repeat("x", server.DefaultMaxMessageBytes-16)))); err != nil {
		t.Fatalf("message under the limit: %v", err)
	}
	// 50 MB: refused.
	big, err := proto.Marshal(wrapperspb.String(strings.Repeat("x", 50<<20)))
	if err != nil {
		t.Fatal(err)
	}
	body := &countingReader{r: bytes.NewReader(big)}
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, url, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/proto")
	req.ContentLength = int64(len(big))
	res, err := http.DefaultClient.Do(req)
	if err == nil {
		_ = res.Body.Close()
		if res.StatusCode != http.StatusTooManyRequests {
			t.Errorf("50 MB request: HTTP %d, want 429 (resource_exhausted)", res.StatusCode)
		}
	}
	if read := body.n.Load(); read > 10<<20 {
		t.Fatalf("the server read %d bytes of a 50 MB request over the limit", read)
	}
}

// TestShutdownLetsCallsSettle shuts a server down while a stream runs
// past the shutdown timeout: Serve cancels it, waits for its handler to
// return and settle, and only then returns, so Close flushes a settled
// store.
func TestShutdownLetsCallsSettle(t *testing.T) {
	t.Parallel()
	cfg, err := server.ParseConfig([]byte("buckets:\n  tokens: { capacity: 100, refill_per_second: 0.001 }\n"))
	if err != nil {
		t.Fatal(err)
	}
	svc := prototest.NewService(t, prototest.Method{Name: "Stream", ServerStreaming: true, Limit: prototest.Limit("tokens", proto.Float64(10))})
	srv, err := server.New(cfg, server.WithServices(svc), server.WithShutdownTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	const proc = "/test.v1.TestService/Stream"
	srv.Handle(proc, connect.NewServerStreamHandler(proc,
		func(ctx context.Context, _ *connect.Request[wrapperspb.StringValue], s *connect.ServerStream[wrapperspb.StringValue]) error {
			if err := interceptor.ReportUsage(ctx, "tokens", 3); err != nil {
				return err
			}
			if err := s.Send(wrapperspb.String("first")); err != nil {
				return err
			}
			<-ctx.Done()                       // cancelled at the end of the shutdown timeout
			time.Sleep(200 * time.Millisecond) // finishing up takes a while
			return ctx.Err()
		}, connect.WithSchema(svc.Methods().Get(0)), srv.HandlerOptions()))
	var lc net.ListenConfig
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](http.DefaultClient, "http://"+ln.Addr().String()+proc)
	stream, err := client.CallServerStream(t.Context(), connect.NewRequest(wrapperspb.String("q")))
	if err != nil {
		t.Fatal(err)
	}
	if !stream.Receive() {
		t.Fatalf("no first message: %v", stream.Err())
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	// The handler settled before Serve returned: 3 tokens, not the 10
	// reserved.
	d, err := srv.Store().Take(t.Context(), bucket.Request{Subject: "ip:127.0.0.1", Charges: []bucket.Charge{
		{Bucket: "tokens", Limit: bucket.Limit{Capacity: 100, RefillPerSecond: 0.001}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if charged := 100 - d.Buckets[0].Remaining; charged < 2.99 || charged > 3.01 {
		t.Fatalf("charged %v tokens after shutdown, want the 3 used", charged)
	}
}
