package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"maps"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/internal/redistest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
	"github.com/connectlimit/connectlimit/proto/connectlimit/v1/connectlimitv1connect"
)

// example is a running copy of the example and clients for it.
type example struct {
	ai    aiservicev1connect.AIServiceClient
	quota connectlimitv1connect.QuotaServiceClient
}

// start runs the example as main would, on a free port, with the built-in
// configuration failing closed with a long store timeout (its leases of 30s
// allow up to 3s): on a busy test machine a slow store must fail the test,
// never let calls through uncharged. It returns clients for it; the server
// stops when the test ends.
func start(t *testing.T, args ...string) *example {
	t.Helper()
	config := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(config, append(slices.Clone(defaultConfig), "\nfailure_policy: closed\nstore_timeout: 3s\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	url := serveExample(t, append([]string{"-config", config}, args...)...)
	return &example{
		ai:    aiservicev1connect.NewAIServiceClient(http.DefaultClient, url),
		quota: connectlimitv1connect.NewQuotaServiceClient(http.DefaultClient, url),
	}
}

// serveExample runs the example as main would with args, on a free port,
// and returns its base URL. The server stops when the test ends.
func serveExample(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", "127.0.0.1:0", "-chunk-delay", "0"}, args...), io.Discard, func(a string) { addrc <- a })
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

// withKey sends apiKey, if any, as a bearer token.
func withKey[T any](req *connect.Request[T], apiKey string) *connect.Request[T] {
	if apiKey != "" {
		req.Header().Set("Authorization", "Bearer "+apiKey)
	}
	return req
}

func (e *example) search(t *testing.T, apiKey string) (*connect.Response[aiservicev1.SearchResponse], error) {
	t.Helper()
	return e.ai.Search(t.Context(), withKey(connect.NewRequest(&aiservicev1.SearchRequest{Query: "token bucket rate limiting", TopK: 3}), apiKey))
}

// generateReport opens a GenerateReport stream. Connect reports the
// stream's errors, denials included, on Receive.
func (e *example) generateReport(ctx context.Context, t *testing.T, apiKey, topic string, maxTokens int32) *connect.ServerStreamForClient[aiservicev1.GenerateReportResponse] {
	t.Helper()
	stream, err := e.ai.GenerateReport(ctx, withKey(connect.NewRequest(&aiservicev1.GenerateReportRequest{Topic: topic, MaxTokens: maxTokens}), apiKey))
	if err != nil {
		t.Fatalf("GenerateReport: %v", err)
	}
	t.Cleanup(func() { _ = stream.Close() })
	return stream
}

// getQuota returns the caller's buckets by name, and the whole response.
func (e *example) getQuota(t *testing.T, apiKey string) (map[string]*connectlimitv1.BucketQuota, *connectlimitv1.GetQuotaResponse) {
	t.Helper()
	res, err := e.quota.GetQuota(t.Context(), withKey(connect.NewRequest(&connectlimitv1.GetQuotaRequest{}), apiKey))
	if err != nil {
		t.Fatalf("GetQuota: %v", err)
	}
	buckets := map[string]*connectlimitv1.BucketQuota{}
	for _, b := range res.Msg.GetBuckets() {
		buckets[b.GetName()] = b
	}
	return buckets, res.Msg
}

// limitParams reads one parameter of every bucket of a RateLimit or
// RateLimit-Policy field: `"search";r=59;t=1, "all_ai_tokens";r=99;t=1`
// with param "r" gives {search: 59, all_ai_tokens: 99}.
func limitParams(t *testing.T, field, param string) map[string]float64 {
	t.Helper()
	params := map[string]float64{}
	for item := range strings.SplitSeq(field, ", ") {
		parts := strings.Split(item, ";")
		name, err := strconv.Unquote(parts[0])
		if err != nil {
			t.Fatalf("bad item %q in %q", item, field)
		}
		for _, p := range parts[1:] {
			if v, ok := strings.CutPrefix(p, param+"="); ok {
				if params[name], err = strconv.ParseFloat(v, 64); err != nil {
					t.Fatalf("bad item %q in %q", item, field)
				}
			}
		}
	}
	return params
}

// errorDetails returns the details of err that are of type T.
func errorDetails[T any](err error) []T {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return nil
	}
	var found []T
	for _, d := range ce.Details() {
		if v, valueErr := d.Value(); valueErr == nil {
			if detail, ok := v.(T); ok {
				found = append(found, detail)
			}
		}
	}
	return found
}

// TestSearchPastItsLimit is the README's promise: the 61st Search in a row
// gets resource_exhausted with RetryInfo and Retry-After, with the
// in-memory store and with Redis.
func TestSearchPastItsLimit(t *testing.T) {
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
			ex := start(t, tc.args...)
			var denied error
			allowed := 0
			for range 70 {
				res, err := ex.search(t, "")
				if err != nil {
					denied = err
					break
				}
				allowed++
				if len(res.Msg.GetResults()) == 0 {
					t.Fatal("Search returned no results")
				}
			}
			// 60 in the burst, plus what refilled (1/s) while we called.
			if allowed < 60 || allowed > 62 {
				t.Fatalf("%d calls allowed before the denial, want 60 (+ refill)", allowed)
			}
			var ce *connect.Error
			if !errors.As(denied, &ce) || ce.Code() != connect.CodeResourceExhausted {
				t.Fatalf("denial = %v, want resource_exhausted", denied)
			}
			retry := errorDetails[*errdetails.RetryInfo](denied)
			if len(retry) != 1 || retry[0].GetRetryDelay().AsDuration() <= 0 || retry[0].GetRetryDelay().AsDuration() > time.Second {
				t.Fatalf("RetryInfo = %v, want one with a delay in (0, 1s]", retry)
			}
			if ra, err := strconv.Atoi(ce.Meta().Get("Retry-After")); err != nil || ra != 1 {
				t.Fatalf("Retry-After = %q, want 1", ce.Meta().Get("Retry-After"))
			}
			// alice's API key has its own buckets, of the free tier.
			res, err := ex.search(t, "demo-key-alice")
			if err != nil {
				t.Fatalf("alice: %v", err)
			}
			if got, want := res.Header().Get("RateLimit"), `"search";r=119;t=1, "all_ai_tokens";r=999999;t=1`; got != want {
				t.Fatalf("alice's RateLimit = %q, want %q", got, want)
			}
		})
	}
}

func TestUnknownAPIKey(t *testing.T) {
	t.Parallel()
	ex := start(t)
	_, err := ex.search(t, "not-a-key")
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("err = %v, want unauthenticated", err)
	}
	if strings.Contains(err.Error(), "not-a-key") {
		t.Fatalf("error echoes the key: %v", err)
	}
}

// The free tier's buckets, from config.yaml.
const (
	freeRequests = 200       // generate_requests, an hour
	freeTokens   = 100_000   // generate_tokens, an hour
	freeAITokens = 1_000_000 // all_ai_tokens, a day
)

// TestGenerateReportReservesThenSettles is the AI cost model end to end: a
// report reserves its estimate (the prompt plus max_tokens) in
// generate_tokens and all_ai_tokens while it streams, and once it ends both
// are settled to exactly usage.total_tokens, with the in-memory store and
// with Redis.
func TestGenerateReportReservesThenSettles(t *testing.T) {
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
			// Slow chunks keep the stream open (16 chunks or more) while the
			// test looks at the reservation.
			ex := start(t, append([]string{"-chunk-delay", "10ms"}, tc.args...)...)
			const (
				key       = "demo-key-alice"
				topic     = "rate limits for LLM APIs"
				maxTokens = 1000
			)
			// The annotation's estimate: the prompt (the topic in a 28-byte
			// template, 4 bytes a token rounded up) plus max_tokens.
			const estimate = float64((len(topic)+31)/4 + maxTokens)
			began := time.Now()
			stream := ex.generateReport(t.Context(), t, key, topic, maxTokens)
			if !stream.Receive() {
				t.Fatalf("GenerateReport: %v", stream.Err())
			}
			streamed := stream.Msg().GetTokens() // completion tokens, summed over the messages

			// The buckets were full, so the headers show the reservation
			// exactly.
			wantRemaining := map[string]float64{
				"generate_requests": freeRequests - 1,
				"generate_tokens":   freeTokens - estimate,
				"all_ai_tokens":     freeAITokens - estimate,
			}
			if got := limitParams(t, stream.ResponseHeader().Get("RateLimit"), "r"); !maps.Equal(got, wantRemaining) {
				t.Fatalf("RateLimit remaining while streaming = %v, want %v", got, wantRemaining)
			}
			// GetQuota sees it too while the stream runs.
			during, _ := ex.getQuota(t, key)
			checkCharged(t, "while streaming", during, time.Since(began), estimate)

			var usage *aiservicev1.Usage
			for stream.Receive() {
				streamed += stream.Msg().GetTokens()
				if u := stream.Msg().GetUsage(); u != nil {
					usage = u
				}
			}
			if err := stream.Err(); err != nil {
				t.Fatal(err)
			}
			total := usage.GetTotalTokens()
			// What the actual expression sums: every chunk's tokens, plus the
			// prompt tokens on the last message.
			if streamed != usage.GetCompletionTokens() || streamed+usage.GetPromptTokens() != total {
				t.Fatalf("usage = %v, with %d completion tokens streamed", usage, streamed)
			}
			if total <= 0 || float64(total) >= estimate {
				t.Fatalf("total_tokens = %d, want in (0, %v): the estimate is an upper bound, and this report ends before max_tokens", total, estimate)
			}
			// The stream has ended, so it has been settled to its usage.
			after, _ := ex.getQuota(t, key)
			checkCharged(t, "after the stream", after, time.Since(began), float64(total))
		})
	}
}

// checkCharged checks that generate_tokens and all_ai_tokens were charged
// want tokens, and generate_requests 1, by the one call made so far.
//
// Buckets refill while the test runs, so a bucket holds between
// capacity - charged and that plus its rate × elapsed. The exact refill
// comes from generate_requests: it was charged 1 token at the same instant
// as the others and is never refunded, so its refill tells how long the
// buckets have been refilling, and the others must have been charged want
// exactly (to 1e-6 tokens) for that time.
func checkCharged(t *testing.T, when string, buckets map[string]*connectlimitv1.BucketQuota, elapsed time.Duration, want float64) {
	t.Helper()
	const epsilon = 1e-6
	requests := buckets["generate_requests"]
	refilling := (1 - (requests.GetCapacity() - requests.GetRemaining())) / requests.GetRefillPerSecond() // seconds
	if refilling < -epsilon || refilling > elapsed.Seconds()+epsilon {
		t.Fatalf("%s: generate_requests = %v: refilling for %vs, want 1 token charged between 0 and %v ago", when, requests, refilling, elapsed)
	}
	for _, name := range []string{"generate_tokens", "all_ai_tokens"} {
		b := buckets[name]
		low, high := b.GetCapacity()-want, b.GetCapacity()-want+b.GetRefillPerSecond()*elapsed.Seconds()
		if r := b.GetRemaining(); r < low-epsilon || r > high+epsilon {
			t.Errorf("%s: %s remaining = %v, want in [%v, %v] (%v charged, then at most %v of refill)", when, name, r, low, high, want, elapsed)
		}
		if charged := b.GetCapacity() - b.GetRemaining() + b.GetRefillPerSecond()*refilling; math.Abs(charged-want) > epsilon {
			t.Errorf("%s: %s was charged %v, want %v", when, name, charged, want)
		}
	}
}

// TestTiers checks that each kind of caller gets its tier's limits, in
// GetQuota and in the RateLimit-Policy of its calls.
func TestTiers(t *testing.T) {
	t.Parallel()
	ex := start(t)
	for _, tc := range []struct {
		name, key    string
		wantSubject  string
		wantTier     string
		wantRequests float64 // generate_requests, an hour
		wantTokens   float64 // generate_tokens, an hour
		wantAITokens float64 // all_ai_tokens, a day
		wantSearch   float64
		wantStreams  int32
	}{
		{"anonymous", "", "ip:127.0.0.1", "anonymous", 20, 10_000, 100_000, 60, 1},
		{"free", "demo-key-alice", "key:alice-demo", "free", 200, 100_000, 1_000_000, 120, 2},
		{"default tier", "demo-key-bob", "key:bob-demo", "free", 200, 100_000, 1_000_000, 120, 2},
		{"pro", "demo-key-pro", "key:carol-pro", "pro", 2_000, 1_000_000, 10_000_000, 1_200, 5},
		{"service", "demo-key-service", "key:batch-jobs", "service", 10_000, 5_000_000, 50_000_000, 6_000, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			buckets, res := ex.getQuota(t, tc.key)
			if res.GetSubject() != tc.wantSubject || res.GetTier() != tc.wantTier {
				t.Errorf("subject, tier = %q, %q, want %q, %q", res.GetSubject(), res.GetTier(), tc.wantSubject, tc.wantTier)
			}
			for _, want := range []struct {
				bucket   string
				capacity float64
				period   time.Duration
			}{
				{"generate_requests", tc.wantRequests, time.Hour},
				{"generate_tokens", tc.wantTokens, time.Hour},
				{"all_ai_tokens", tc.wantAITokens, 24 * time.Hour},
				{"search", tc.wantSearch, time.Minute},
			} {
				b := buckets[want.bucket]
				wantRate := want.capacity / want.period.Seconds()
				if b.GetCapacity() != want.capacity || math.Abs(b.GetRefillPerSecond()-wantRate) > 1e-9*wantRate || b.GetRemaining() != want.capacity {
					t.Errorf("%s = %v, want full at %v, refilling in %v", want.bucket, b, want.capacity, want.period)
				}
			}
			if c := res.GetConcurrency(); len(c) != 1 || c[0].GetName() != "generate_streams" || c[0].GetLimit() != tc.wantStreams {
				t.Errorf("concurrency = %v, want generate_streams %d", c, tc.wantStreams)
			}
			res2, err := ex.search(t, tc.key)
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]float64{"search": tc.wantSearch, "all_ai_tokens": tc.wantAITokens}
			if got := limitParams(t, res2.Header().Get("RateLimit-Policy"), "q"); !maps.Equal(got, want) {
				t.Errorf("RateLimit-Policy capacities = %v, want %v", got, want)
			}
		})
	}
}

// TestThirdStreamIsDenied checks generate_streams: a free caller may have
// two reports streaming at once; a third is denied until one ends.
func TestThirdStreamIsDenied(t *testing.T) {
	t.Parallel()
	// Slow chunks keep the streams open: a report has 16 chunks or more.
	ex := start(t, "-chunk-delay", "50ms")
	const key, topic = "demo-key-alice", "concurrency limits"
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	first := ex.generateReport(ctx, t, key, topic, 1000)
	second := ex.generateReport(ctx, t, key, topic, 1000)
	for _, s := range []*connect.ServerStreamForClient[aiservicev1.GenerateReportResponse]{first, second} {
		if !s.Receive() {
			t.Fatalf("GenerateReport: %v", s.Err())
		}
	}
	third := ex.generateReport(t.Context(), t, key, topic, 1000)
	if third.Receive() {
		t.Fatal("a third concurrent stream was allowed")
	}
	err := third.Err()
	if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), `"generate_streams"`) {
		t.Fatalf("third stream: %v, want resource_exhausted naming generate_streams", err)
	}
	qf := errorDetails[*errdetails.QuotaFailure](err)
	if len(qf) != 1 || len(qf[0].GetViolations()) != 1 ||
		qf[0].GetViolations()[0].GetQuotaId() != "generate_streams" || qf[0].GetViolations()[0].GetSubject() != "key:alice-demo" {
		t.Fatalf("QuotaFailure = %v, want one violation of generate_streams by key:alice-demo", qf)
	}
	if ri := errorDetails[*errdetails.RetryInfo](err); len(ri) != 0 {
		t.Fatalf("RetryInfo = %v, want none: when a slot frees up depends on other calls", ri)
	}
	// Another caller has slots of its own.
	other := ex.generateReport(ctx, t, "demo-key-bob", topic, 1000)
	if !other.Receive() {
		t.Fatalf("bob's stream: %v", other.Err())
	}
	// Ending a stream frees its slot.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		again := ex.generateReport(ctx, t, key, topic, 1000)
		if again.Receive() {
			break
		}
		if connect.CodeOf(again.Err()) != connect.CodeResourceExhausted || time.Now().After(deadline) {
			t.Fatalf("after closing a stream: %v", again.Err())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReportTooBigForTier checks that a report whose estimate exceeds the
// caller's bucket is denied as never affordable, and charges nothing.
func TestReportTooBigForTier(t *testing.T) {
	t.Parallel()
	ex := start(t)
	const topic = "everything about rate limiting"
	// Anonymous callers hold at most 10,000 generate_tokens.
	stream := ex.generateReport(t.Context(), t, "", topic, 20_000)
	if stream.Receive() {
		t.Fatal("a report estimated at over 20,000 tokens was allowed")
	}
	err := stream.Err()
	if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "can never be allowed") {
		t.Fatalf("err = %v, want resource_exhausted saying it can never be allowed", err)
	}
	if ri := errorDetails[*errdetails.RetryInfo](err); len(ri) != 0 {
		t.Fatalf("RetryInfo = %v, want none: no wait helps", ri)
	}
	if ra := stream.ResponseHeader().Get("Retry-After"); ra != "" {
		t.Fatalf("Retry-After = %q, want none", ra)
	}
	qf := errorDetails[*errdetails.QuotaFailure](err)
	if len(qf) != 1 || len(qf[0].GetViolations()) != 1 || qf[0].GetViolations()[0].GetQuotaId() != "generate_tokens" {
		t.Fatalf("QuotaFailure = %v, want one violation of generate_tokens", qf)
	}
	buckets, _ := ex.getQuota(t, "")
	for name, b := range buckets {
		if b.GetRemaining() != b.GetCapacity() {
			t.Errorf("%s = %v, want full: a denied call charges nothing", name, b)
		}
	}
	// The same report fits a pro key's bucket.
	pro := ex.generateReport(t.Context(), t, "demo-key-pro", topic, 20_000)
	for pro.Receive() {
	}
	if err := pro.Err(); err != nil {
		t.Fatalf("pro: %v", err)
	}
}

func TestBadFlagsAndConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		args   []string
		wantIn string
	}{
		{"missing config file", []string{"-config", "/nonexistent/connectlimit.yaml"}, "/nonexistent/connectlimit.yaml"},
		{"bad redis URL", []string{"-redis", "http://x"}, "redis URL"},
		{"unreachable redis", []string{"-redis", "redis://127.0.0.1:1/0"}, "does not answer"},
		{"stray argument", []string{"extra"}, "extra"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := run(t.Context(), append([]string{"-addr", "127.0.0.1:0"}, tc.args...), io.Discard, nil)
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("run error = %v, want one mentioning %q", err, tc.wantIn)
			}
		})
	}
}

// TestHelp checks that -h prints the flags and is not an error: main exits
// 0 for it.
func TestHelp(t *testing.T) {
	t.Parallel()
	var out strings.Builder
	err := run(t.Context(), []string{"-h"}, &out, nil)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("run(-h) = %v, want flag.ErrHelp, which main treats as success", err)
	}
	for _, name := range []string{"-addr", "-redis", "-config", "-chunk-delay"} {
		if !strings.Contains(out.String(), name) {
			t.Errorf("usage does not mention %s:\n%s", name, out.String())
		}
	}
}
