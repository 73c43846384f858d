package server_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/internal/prototest"
	"github.com/connectlimit/connectlimit/internal/redistest"
	"github.com/connectlimit/connectlimit/server"
)

// validYAML fails closed with a long timeout: on a busy test machine a slow
// store must fail a test, never let calls through uncharged.
const validYAML = `
failure_policy: closed
store_timeout: 10s
buckets:
  search: { capacity: 2, refill_per_second: 0.001 }
api_keys:
  secret-key-1: { user: alice, name: alice-key }
  secret-key-2: { user: bob }
`

func TestParseConfigErrors(t *testing.T) {
	t.Parallel()
	const buckets = "buckets:\n  search: { capacity: 2, refill_per_second: 1 }\n"
	for _, tc := range []struct {
		name   string
		yaml   string
		wantIn string
	}{
		{"bucket error from costmap", "buckets:\n  search: { capacity: -2, refill_per_second: 1 }\n", "buckets.search.capacity"},
		{"unknown top-level field", buckets + "api_key: {}\n", "api_key"},
		{"unknown api key field", buckets + "api_keys:\n  k: { usr: a }\n", "usr"},
		{"bad policy", buckets + "failure_policy: maybe\n", `failure_policy must be local, open or closed, got "maybe"`},
		{"negative timeout", buckets + "store_timeout: -1s\n", "store_timeout"},
		{"timeout under 1ms", buckets + "store_timeout: 1ns\n", "store_timeout must be from 1ms to 1m0s, got 1ns"},
		{"bad timeout", buckets + "store_timeout: soon\n", "soon"},
		{"bad proxy", buckets + "trusted_proxies: [10.0.0.0/33]\n", `trusted_proxies[0]`},
		{"key with space", buckets + "api_keys:\n  \"bad key\": { user: a }\n", "api_keys"},
		{"duplicate key names", buckets + "api_keys:\n  k1: { user: a, name: shared }\n  k2: { user: b, name: shared }\n", `have the name "shared"`},
		{"local share over 1", buckets + "local_share: 2\n", "local_share must be greater than 0 and at most 1, got 2"},
		{"negative redis groups", buckets + "redis_groups: -1\n", "redis_groups must be from 1 to 4294967296 (0 for the default), got -1"},
		{"too many redis groups", buckets + "redis_groups: 4294967297\n", "redis_groups must be from 1 to 4294967296 (0 for the default), got 4294967297"},
		{"denial cache not a bool", buckets + "denial_cache: maybe\n", "`maybe` into bool"},
		{"lease under a second", buckets + "concurrency:\n  c: { limit: 1, lease: 1ms }\n", "concurrency.c.lease must be at least 1s, got 1ms"},
		{"lease under 10 store timeouts", buckets + "store_timeout: 500ms\nconcurrency:\n  c: { limit: 1, lease: 2s }\n", "concurrency.c.lease is 2s, but must be at least 10 × store_timeout (5s)"},
		{"default lease under 10 store timeouts", buckets + "store_timeout: 5s\nconcurrency:\n  c: { limit: 1 }\n", "concurrency.c.lease is the default 30s"},
		{"tier lease under 10 store timeouts", buckets + "store_timeout: 1s\nconcurrency:\n  c: { limit: 1, lease: 1m }\ntiers:\n  pro: { concurrency: { c: { lease: 5s } } }\n", "tiers.pro.concurrency.c.lease is 5s"},
		{"capacity past 1e15", "buckets:\n  search: { capacity: 1e20, refill_per_second: 1 }\n", "buckets.search.capacity must be greater than 0 and at most 1e+15, got 1e+20"},
		{"second document", buckets + "---\nbuckets: {}\n", "second YAML document"},
		{"reserved bucket name", "buckets:\n  connectlimit.auth_failures: { capacity: 2, refill_per_second: 1 }\n", "keeps for its own buckets"},
		{"bad auth failure limit", buckets + "auth_failures: { capacity: 0, period: 1m }\n", "auth_failures.capacity"},
		{"negative max message bytes", buckets + "max_message_bytes: -1\n", "max_message_bytes"},
		{"negative read timeout", buckets + "read_timeout: -1s\n", "read_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := server.ParseConfig([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.wantIn)
			}
			if strings.Contains(err.Error(), "bad key") {
				t.Fatalf("error echoes a secret key: %v", err)
			}
		})
	}
	if _, err := server.LoadConfig("/nonexistent.yaml"); err == nil || !strings.Contains(err.Error(), "/nonexistent.yaml") {
		t.Fatalf("LoadConfig of a missing file: %v", err)
	}
}

// parse parses a configuration, as LoadConfig does.
func parse(yaml string) (server.Config, error) { return server.ParseConfig([]byte(yaml)) }

// serveYAML builds a server from a configuration, serves it as serve does
// and returns the procedure's URL.
func serveYAML(t *testing.T, yaml string, opts ...server.Option) string {
	t.Helper()
	cfg, err := server.ParseConfig([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(cfg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, srv)
}

// serve starts srv with one limited unary procedure and returns its URL.
func serve(t *testing.T, srv *server.Server) string {
	t.Helper()
	svc := prototest.NewService(t, prototest.Method{Name: "Search", Limit: prototest.Limit("search", nil)})
	const proc = "/test.v1.TestService/Search"
	srv.Handle(proc, connect.NewUnaryHandler(proc,
		func(_ context.Context, r *connect.Request[wrapperspb.StringValue]) (*connect.Response[wrapperspb.StringValue], error) {
			return connect.NewResponse(r.Msg), nil
		}, connect.WithSchema(svc.Methods().Get(0)), srv.HandlerOptions()))
	var lc net.ListenConfig
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		_ = srv.Close()
	})
	return "http://" + ln.Addr().String() + proc
}

func TestAPIKeysAndLimits(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	for _, tc := range []struct {
		name string
		opts []server.Option
	}{
		{"memory", nil},
		{"redis URL", []server.Option{server.WithRedisURL("redis://" + rs.Addr() + "/1")}},
		{"redis client", []server.Option{server.WithRedis(rs.NewClient(t))}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			url := serveYAML(t, validYAML, tc.opts...)
			client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](http.DefaultClient, url)
			call := func(auth string) error {
				req := connect.NewRequest(wrapperspb.String("q"))
				if auth != "" {
					req.Header().Set("Authorization", auth)
				}
				_, err := client.CallUnary(t.Context(), req)
				return err
			}
			for _, auth := range []string{"Bearer wrong", "Basic c2VjcmV0LWtleS0x"} {
				if err := call(auth); connect.CodeOf(err) != connect.CodeUnauthenticated {
					t.Fatalf("auth %q: %v, want unauthenticated", auth, err)
				}
			}
			// Each subject gets two calls, then is denied; the subject in
			// QuotaFailure names the key, never the secret.
			for auth, wantSubject := range map[string]string{
				"Bearer secret-key-1": "key:alice-key",
				"Bearer secret-key-2": "key:sha256:",
				"":                    "ip:127.0.0.1",
			} {
				for i := range 2 {
					if err := call(auth); err != nil {
						t.Fatalf("auth %q: call %d: %v", auth, i, err)
					}
				}
				err := call(auth)
				if connect.CodeOf(err) != connect.CodeResourceExhausted {
					t.Fatalf("auth %q: third call: %v, want resource_exhausted", auth, err)
				}
				subject := quotaSubject(t, err)
				if !strings.HasPrefix(subject, wantSubject) || strings.Contains(subject, "secret") {
					t.Fatalf("auth %q: subject %q, want prefix %q", auth, subject, wantSubject)
				}
			}
			// gRPC clients (over h2c) share the same, now empty, buckets.
			grpc := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](h2cClient(), url, connect.WithGRPC())
			if _, err := grpc.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q"))); connect.CodeOf(err) != connect.CodeResourceExhausted {
				t.Fatalf("gRPC after draining: %v, want resource_exhausted", err)
			}
		})
	}
}

// h2cClient speaks cleartext HTTP/2, as gRPC needs.
func h2cClient() *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: &p}}
}

func quotaSubject(t *testing.T, err error) string {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Fatalf("not a connect error: %v", err)
	}
	for _, d := range ce.Details() {
		if v, derr := d.Value(); derr == nil {
			if qf, ok := v.(*errdetails.QuotaFailure); ok && len(qf.GetViolations()) > 0 {
				return qf.GetViolations()[0].GetSubject()
			}
		}
	}
	t.Fatalf("no QuotaFailure in %v", err)
	return ""
}

func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	cfg, err := server.ParseConfig([]byte(validYAML))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(cfg, server.WithShutdownTimeout(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	release := make(chan struct{})
	entered := make(chan struct{})
	srv.Handle("/slow", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		close(entered)
		<-release
		_, _ = w.Write([]byte("done"))
	}))
	var lc net.ListenConfig
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	got := make(chan string, 1)
	go func() {
		res, err := http.Get("http://" + ln.Addr().String() + "/slow") //nolint:noctx // test
		if err != nil {
			got <- err.Error()
			return
		}
		defer res.Body.Close()
		b := make([]byte, 4)
		n, _ := res.Body.Read(b)
		got <- string(b[:n])
	}()
	<-entered
	cancel()
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v with a call in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if body := <-got; body != "done" {
		t.Fatalf("in-flight call got %q, want done", body)
	}
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

func TestNewErrors(t *testing.T) {
	t.Parallel()
	cfg, err := server.ParseConfig([]byte(validYAML))
	if err != nil {
		t.Fatal(err)
	}
	rs := redistest.Start(t)
	for _, tc := range []struct {
		name   string
		opts   []server.Option
		wantIn string
	}{
		{"unparsable URL", []server.Option{server.WithRedisURL("mysql://x")}, "redis URL"},
		{"password is redacted", []server.Option{server.WithRedisURL("redis://u:hunter2@127.0.0.1:1/0")}, "u:xxxxx@127.0.0.1:1"},
		{"both redis options", []server.Option{server.WithRedisURL("redis://" + rs.Addr()), server.WithRedis(rs.NewClient(t))}, "exclusive"},
		{"annotation names unknown bucket", []server.Option{server.WithServices(prototest.NewService(t,
			prototest.Method{Name: "M", Limit: prototest.Limit("nope", nil)}))}, `"nope"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := server.New(cfg, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.wantIn)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error leaks the password: %v", err)
			}
		})
	}
}
