package main

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// logBuffer collects the example's log, safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// serveLogged runs the example as start does (the built-in configuration,
// failing closed), keeping its log, and returns a client for it.
func serveLogged(t *testing.T, args ...string) (aiservicev1connect.AIServiceClient, *logBuffer) {
	t.Helper()
	config := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(config, append(slices.Clone(defaultConfig), "\nfailure_policy: closed\nstore_timeout: 3s\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	logs := &logBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", "127.0.0.1:0", "-chunk-delay", "0", "-config", config}, args...), logs, func(a string) { addrc <- a })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	select {
	case addr := <-addrc:
		return aiservicev1connect.NewAIServiceClient(http.DefaultClient, "http://"+addr), logs
	case err := <-done:
		t.Fatalf("run exited early: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("server did not start in 30s")
	}
	return nil, nil
}

// burst generates reports concurrently, as the service key (20 streams at
// once), and returns the errors of those that failed.
func burst(t *testing.T, ai aiservicev1connect.AIServiceClient, reports int) []error {
	t.Helper()
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for i := range reports {
		wg.Go(func() {
			req := connect.NewRequest(&aiservicev1.GenerateReportRequest{Topic: "burst " + string(rune('a'+i%26)), MaxTokens: 188})
			req.Header().Set("Authorization", "Bearer demo-key-service")
			stream, err := ai.GenerateReport(t.Context(), req)
			if err == nil {
				var usage *aiservicev1.Usage
				for stream.Receive() {
					if u := stream.Msg().GetUsage(); u != nil {
						usage = u
					}
				}
				err = stream.Err()
				if err == nil && usage == nil {
					t.Errorf("report %d ended without its usage", i)
				}
				_ = stream.Close()
			}
			if err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errs
}

// TestLLMLimiterAbsorbsUpstreamLimit gives the fake LLM a limit of 1,000
// tokens a second (2,000 at once) and sends a burst of 20 reports of about
// 200 tokens each: twice what the model takes at once. Without the
// outbound limiter, the model's refusals reach callers as unavailable.
// With a limiter that expects twice the model's real rate, the model still
// refuses some calls, the limiter slows down (it logs it), and every
// report completes.
func TestLLMLimiterAbsorbsUpstreamLimit(t *testing.T) {
	t.Parallel()
	const reports = 20
	redis := redistest.Start(t)
	for _, tc := range []struct {
		name        string
		args        []string
		wantFailed  bool
		wantSlowing bool
	}{
		{"no limiter", []string{"-llm-upstream-rate", "1000"}, true, false},
		{"limiter in memory", []string{"-llm-upstream-rate", "1000", "-llm-rate", "2000"}, false, true},
		{"limiter in Redis", []string{"-llm-upstream-rate", "1000", "-llm-rate", "2000", "-redis", "redis://" + redis.Addr() + "/0"}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ai, logs := serveLogged(t, tc.args...)
			start := time.Now()
			errs := burst(t, ai, reports)
			t.Logf("%d reports in %v, %d failed", reports, time.Since(start).Round(time.Millisecond), len(errs))
			for _, err := range errs {
				if connect.CodeOf(err) != connect.CodeUnavailable || !tc.wantFailed {
					t.Fatalf("report failed: %v", err)
				}
			}
			if tc.wantFailed && len(errs) == 0 {
				t.Fatal("every report completed: the model's limit did not bite")
			}
			slowed := strings.Count(logs.String(), "upstream pushed back")
			if tc.wantSlowing != (slowed > 0) {
				t.Fatalf("the limiter slowed down %d times; log:\n%s", slowed, logs)
			}
			t.Logf("the limiter slowed down %d times", slowed)
			if testing.Verbose() {
				for line := range strings.Lines(logs.String()) {
					if strings.Contains(line, "outbound") {
						t.Log(strings.TrimSpace(line))
					}
				}
			}
		})
	}
}
