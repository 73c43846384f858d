package main

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// start runs the example as main would, on a free port, and returns a
// client for it. The server stops when the test ends.
func start(t *testing.T, args ...string) aiservicev1connect.AIServiceClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", "127.0.0.1:0", "-chunk-delay", "0"}, args...), io.Discard, func(a string) { addrc <- a })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	select {
	case addr := <-addrc:
		return aiservicev1connect.NewAIServiceClient(http.DefaultClient, "http://"+addr)
	case err := <-done:
		t.Fatalf("run exited early: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("server did not start in 30s")
	}
	return nil
}

func search(t *testing.T, c aiservicev1connect.AIServiceClient, apiKey string) (*connect.Response[aiservicev1.SearchResponse], error) {
	t.Helper()
	req := connect.NewRequest(&aiservicev1.SearchRequest{Query: "token bucket rate limiting", TopK: 3})
	if apiKey != "" {
		req.Header().Set("Authorization", "Bearer "+apiKey)
	}
	return c.Search(t.Context(), req)
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
			client := start(t, tc.args...)
			var denied error
			allowed := 0
			for range 70 {
				res, err := search(t, client, "")
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
			var retry *errdetails.RetryInfo
			for _, d := range ce.Details() {
				if v, err := d.Value(); err == nil {
					if ri, ok := v.(*errdetails.RetryInfo); ok {
						retry = ri
					}
				}
			}
			if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 || retry.GetRetryDelay().AsDuration() > time.Second {
				t.Fatalf("RetryInfo = %v, want a delay in (0, 1s]", retry)
			}
			if ra, err := strconv.Atoi(ce.Meta().Get("Retry-After")); err != nil || ra != 1 {
				t.Fatalf("Retry-After = %q, want 1", ce.Meta().Get("Retry-After"))
			}
			// alice's API key has its own bucket.
			res, err := search(t, client, "demo-key-alice")
			if err != nil {
				t.Fatalf("alice: %v", err)
			}
			if got := res.Header().Get("RateLimit"); got != `"search";r=59;t=1` {
				t.Fatalf("alice's RateLimit = %q", got)
			}
		})
	}
}

func TestUnknownAPIKey(t *testing.T) {
	t.Parallel()
	client := start(t)
	_, err := search(t, client, "not-a-key")
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("err = %v, want unauthenticated", err)
	}
	if strings.Contains(err.Error(), "not-a-key") {
		t.Fatalf("error echoes the key: %v", err)
	}
}

func TestGenerateReportStreamsWithHeaders(t *testing.T) {
	t.Parallel()
	client := start(t)
	req := connect.NewRequest(&aiservicev1.GenerateReportRequest{Topic: "rate limits for LLM APIs", MaxTokens: 64})
	req.Header().Set("Authorization", "Bearer demo-key-bob")
	stream, err := client.GenerateReport(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	var tokens int32
	var usage *aiservicev1.Usage
	for stream.Receive() {
		tokens += stream.Msg().GetTokens()
		if u := stream.Msg().GetUsage(); u != nil {
			usage = u
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if usage == nil || usage.GetCompletionTokens() != tokens || tokens == 0 || tokens > 64 {
		t.Fatalf("usage = %v with %d streamed tokens", usage, tokens)
	}
	if got := stream.ResponseHeader().Get("RateLimit"); got != `"generate";r=19950;t=4` {
		t.Fatalf("RateLimit = %q", got)
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
