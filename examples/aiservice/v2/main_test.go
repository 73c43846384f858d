package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	connectv1 "connectrpc.com/connect"
	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"go.uber.org/goleak"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	aiservicev1connectv1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
	servicev1 "github.com/connectlimit/connectlimit/examples/aiservice/service"
	"github.com/connectlimit/connectlimit/examples/aiservice/v2/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/interceptor/v2/gen/connectlimit/v1/connectlimitv1connect"
	"github.com/connectlimit/connectlimit/internal/redistest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
	connectlimitv1connectv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1/connectlimitv1connect"
	"github.com/connectlimit/connectlimit/server"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// go-redis redials in the background, once a second; it notices
		// that its client was closed only after that sleep.
		goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"),
	)
}

// testConfig is the built-in configuration failing closed with a long store
// timeout, as the v1 example's tests run it: on a busy test machine a slow
// store must fail a test, never let calls through uncharged.
func testConfig() []byte {
	return append(slices.Clone(defaultConfig), "\nfailure_policy: closed\nstore_timeout: 3s\n"...)
}

// serveV2 runs this example as main would with args, on a free port, and
// returns its base URL. The server stops when the test ends.
func serveV2(t *testing.T, args ...string) string {
	t.Helper()
	config := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(config, testConfig(), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", "127.0.0.1:0", "-chunk-delay", "0", "-config", config}, args...), io.Discard, func(a string) { addrc <- a })
	}()
	var exited bool // run's result was already received
	t.Cleanup(func() {
		cancel()
		if exited {
			return
		}
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	select {
	case addr := <-addrc:
		return "http://" + addr
	case err := <-done:
		exited = true
		t.Fatalf("run exited early: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("server did not start in 30s")
	}
	return ""
}

// serveV1 runs the connect-go v1 example as its main assembles it by
// default (the server package and the service package on the same fake
// model), on a free port, and returns its base URL.
func serveV1(t *testing.T) string {
	t.Helper()
	cfg, err := server.ParseConfig(testConfig())
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(cfg,
		server.WithServices(aiservicev1.File_aiservice_v1_aiservice_proto.Services().ByName("AIService")),
		server.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	srv.Handle(aiservicev1connectv1.NewAIServiceHandler(servicev1.New(llm.New()), srv.HandlerOptions()))
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
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("serve: %v", err)
		}
		_ = srv.Close()
	})
	return "http://" + ln.Addr().String()
}

func TestConfigIsTheV1Examples(t *testing.T) {
	t.Parallel()
	v1, err := os.ReadFile("../config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(v1, defaultConfig) {
		t.Fatal("config.yaml differs from ../config.yaml: copy it again (cp ../config.yaml .)")
	}
}

// step is one call of the sequence TestLimitsLikeV1 sends to both
// examples.
type step struct {
	key       string // API key; empty for anonymous
	report    bool   // GenerateReport, else Search
	maxTokens int32
}

// outcome is what one step got: its code (0 for success), the RateLimit
// remaining and the refill rate (RateLimit-Policy's q/w) of each bucket,
// from the headers of a success or the metadata of a denial, and how long
// the call took.
type outcome struct {
	code      connectv1.Code
	remaining map[string]float64
	rate      map[string]float64
	took      time.Duration
}

// call sends s to the example at url with connect-go v1 clients (the
// wire is the same for both examples).
func (s step) call(t *testing.T, url string) outcome {
	t.Helper()
	start := time.Now()
	ai := aiservicev1connectv1.NewAIServiceClient(http.DefaultClient, url)
	var header http.Header
	var err error
	if s.report {
		req := connectv1.NewRequest(&aiservicev1.GenerateReportRequest{Topic: "token buckets", MaxTokens: s.maxTokens})
		withKey(req.Header(), s.key)
		var stream *connectv1.ServerStreamForClient[aiservicev1.GenerateReportResponse]
		if stream, err = ai.GenerateReport(t.Context(), req); err == nil {
			for stream.Receive() {
			}
			err, header = stream.Err(), stream.ResponseHeader()
			_ = stream.Close()
		}
	} else {
		req := connectv1.NewRequest(&aiservicev1.SearchRequest{Query: "token bucket rate limiting", TopK: 3})
		withKey(req.Header(), s.key)
		var res *connectv1.Response[aiservicev1.SearchResponse]
		if res, err = ai.Search(t.Context(), req); err == nil {
			header = res.Header()
		}
	}
	var ce *connectv1.Error
	if errors.As(err, &ce) {
		header = ce.Meta()
	} else if err != nil {
		t.Fatalf("%+v: %v", s, err)
	}
	o := outcome{code: connectv1.CodeOf(err), remaining: params(t, header.Get("RateLimit"), "r"), took: time.Since(start)}
	if err == nil {
		o.code = 0
	}
	q, w := params(t, header.Get("RateLimit-Policy"), "q"), params(t, header.Get("RateLimit-Policy"), "w")
	o.rate = map[string]float64{}
	for name := range q {
		o.rate[name] = q[name] / w[name]
	}
	return o
}

func withKey(h http.Header, key string) {
	if key != "" {
		h.Set("Authorization", "Bearer "+key)
	}
}

// params reads one parameter of every bucket of a RateLimit or
// RateLimit-Policy field.
func params(t *testing.T, field, param string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for item := range strings.SplitSeq(field, ", ") {
		if item == "" {
			continue
		}
		parts := strings.Split(item, ";")
		name, err := strconv.Unquote(parts[0])
		if err != nil {
			t.Fatalf("bad item %q", item)
		}
		for _, p := range parts[1:] {
			if v, ok := strings.CutPrefix(p, param+"="); ok {
				out[name], _ = strconv.ParseFloat(v, 64)
			}
		}
	}
	return out
}

// TestLimitsLikeV1 sends one sequence of Search and GenerateReport calls,
// step by step, to the connect-go v1 example and to this one, both on the
// built-in configuration: every step must be allowed or denied alike,
// with the same RateLimit fields, and the callers' buckets must end the
// same. The examples run on the real clock, and their buckets refill
// between their calls (generate_tokens by 2.8 tokens a second for
// anonymous callers, 278 for pro keys): the remaining tokens may differ by
// the refill of twice the slowest call (the skew between the two
// examples' views of a bucket's age), and by one more for RateLimit's
// whole tokens.
func TestLimitsLikeV1(t *testing.T) {
	t.Parallel()
	v1, v2 := serveV1(t), serveV2(t)
	var steps []step
	for range 62 { // anonymous: 60 searches, then denied (refill 1/s)
		steps = append(steps, step{})
	}
	// Anonymous: 10,000 generate_tokens an hour, each report reserving
	// about 9,000 and using about 350: the fourth is denied; then small
	// reports until the 20 generate_requests an hour run out; then one
	// that could never be paid.
	for range 4 {
		steps = append(steps, step{report: true, maxTokens: 9000})
	}
	for range 18 {
		steps = append(steps, step{report: true, maxTokens: 100})
	}
	steps = append(steps, step{report: true, maxTokens: 20000})
	// Free and pro keys, their own buckets.
	for range 3 {
		steps = append(steps, step{key: "demo-key-alice"}, step{key: "demo-key-alice", report: true, maxTokens: 32768},
			step{key: "demo-key-pro", report: true, maxTokens: 32768})
	}
	steps = append(steps, step{key: "not-a-key"}, step{key: "demo-key-bob", report: true, maxTokens: 0})

	var codes []connectv1.Code
	var slowest time.Duration
	for i, s := range steps {
		want, got := s.call(t, v1), s.call(t, v2)
		codes = append(codes, got.code)
		slowest = max(slowest, want.took, got.took)
		if got.code != want.code {
			t.Fatalf("step %d %+v: v2 answered %v, v1 %v", i, s, got.code, want.code)
		}
		if len(got.remaining) != len(want.remaining) {
			t.Fatalf("step %d %+v: v2 RateLimit %v, v1 %v", i, s, got.remaining, want.remaining)
		}
		for name, r := range want.remaining {
			tolerance := 1 + want.rate[name]*2*slowest.Seconds()
			if d := math.Abs(got.remaining[name] - r); d > tolerance {
				t.Fatalf("step %d %+v: bucket %s: v2 has %v left, v1 %v (tolerance %.2f)", i, s, name, got.remaining[name], r, tolerance)
			}
		}
	}
	t.Logf("%d steps; the slowest call took %v", len(steps), slowest)
	// The sequence met every kind of answer.
	for _, code := range []connectv1.Code{0, connectv1.CodeResourceExhausted, connectv1.CodeUnauthenticated, connectv1.CodeInvalidArgument} {
		if !slices.Contains(codes, code) {
			t.Errorf("no step answered %v: %v", code, codes)
		}
	}
	for _, key := range []string{"", "demo-key-alice", "demo-key-pro", "demo-key-bob"} {
		want, got := quota(t, v1, key), quota(t, v2, key)
		if want.GetSubject() != got.GetSubject() || want.GetTier() != got.GetTier() || len(want.GetBuckets()) != len(got.GetBuckets()) {
			t.Fatalf("key %q: v2 GetQuota %v, v1 %v", key, got, want)
		}
		for i, b := range want.GetBuckets() {
			tolerance := b.GetRefillPerSecond() * 2 * slowest.Seconds()
			if g := got.GetBuckets()[i]; g.GetName() != b.GetName() || math.Abs(g.GetRemaining()-b.GetRemaining()) > tolerance {
				t.Errorf("key %q: bucket %s: v2 has %v left, v1 %v", key, b.GetName(), g.GetRemaining(), b.GetRemaining())
			}
		}
	}
}

// quota asks the example at url for key's buckets, with connect-go v1's
// QuotaService client.
func quota(t *testing.T, url, key string) *connectlimitv1.GetQuotaResponse {
	t.Helper()
	req := connectv1.NewRequest(&connectlimitv1.GetQuotaRequest{})
	withKey(req.Header(), key)
	res, err := connectlimitv1connectv1.NewQuotaServiceClient(http.DefaultClient, url).GetQuota(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	return res.Msg
}

// TestV2Clients calls this example with connect-go v2 clients, with the
// in-memory store and with Redis: a report settles to its usage, which
// GetQuota reports, and an unknown key is refused before anything is
// charged.
func TestV2Clients(t *testing.T) {
	t.Parallel()
	redis := redistest.Start(t)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"memory", nil},
		{"redis", []string{"-redis", "redis://" + redis.Addr() + "/0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			client := connect.NewClient(connecthttp.NewTransport(http.DefaultClient, serveV2(t, tc.args...)))
			ai, quotas := aiservicev1connect.NewAIServiceClient(client), connectlimitv1connect.NewQuotaServiceClient(client)

			ctx, info := connect.NewClientContext(t.Context())
			info.RequestHeader().Set("Authorization", "Bearer demo-key-alice")
			stream, err := ai.GenerateReport(ctx, &aiservicev1.GenerateReportRequest{Topic: "token buckets", MaxTokens: 500})
			if err != nil {
				t.Fatal(err)
			}
			var usage int32
			for {
				res, err := stream.Receive()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				usage += res.GetUsage().GetTotalTokens()
			}
			if usage == 0 || !strings.Contains(info.ResponseHeader().Get("RateLimit"), `"generate_tokens";r=`) {
				t.Fatalf("usage %d, headers %v", usage, info.ResponseHeader())
			}
			ctx, info = connect.NewClientContext(t.Context())
			info.RequestHeader().Set("Authorization", "Bearer demo-key-alice")
			q, err := quotas.GetQuota(ctx, &connectlimitv1.GetQuotaRequest{Buckets: []string{"generate_tokens"}})
			if err != nil {
				t.Fatal(err)
			}
			// Settled to the usage, plus a little refill (28 tokens a
			// second) since.
			if b := q.GetBuckets(); q.GetSubject() != "key:alice-demo" || q.GetTier() != "free" || len(b) != 1 ||
				b[0].GetRemaining() < float64(100_000-usage) || b[0].GetRemaining() > float64(100_000-usage)+b[0].GetRefillPerSecond() {
				t.Fatalf("GetQuota = %v, want alice-demo's generate_tokens at %d", q, 100_000-usage)
			}

			ctx, info = connect.NewClientContext(t.Context())
			info.RequestHeader().Set("Authorization", "Bearer not-a-key")
			if _, err := ai.Search(ctx, &aiservicev1.SearchRequest{Query: "q"}); connect.CodeOf(err) != connect.CodeUnauthenticated {
				t.Fatalf("an unknown key: %v, want unauthenticated", err)
			}
		})
	}
}

func TestBadFlagsAndConfig(t *testing.T) {
	t.Parallel()
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("buckets: {}\ncors: {allowed_origins: ['*']}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args   []string
		wantIn string
	}{
		{[]string{"extra"}, "unexpected arguments"},
		{[]string{"-config", bad}, "cors"},
		{[]string{"-config", filepath.Join(t.TempDir(), "missing.yaml")}, "no such file"},
		{[]string{"-redis", "ftp://nowhere"}, "-redis"},
	} {
		err := run(t.Context(), tc.args, io.Discard, nil)
		if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
			t.Errorf("run(%q) = %v, want an error mentioning %q", tc.args, err, tc.wantIn)
		}
	}
}
