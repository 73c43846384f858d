package main

import (
	"os"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/costmap"
	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
)

// TestReadmeSmallExample checks the README's "A small example": the
// configuration it shows declares every bucket and concurrency limit the
// example service's annotations name, so that the Go it shows works when
// copied.
func TestReadmeSmallExample(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "## A small example")
	if !ok {
		t.Fatal(`README has no "## A small example"`)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	_, block, ok := strings.Cut(section, "```yaml\n")
	if !ok {
		t.Fatal("the small example shows no configuration")
	}
	block, _, _ = strings.Cut(block, "```")
	cfg, err := costmap.ParseConfig([]byte(block))
	if err != nil {
		t.Fatalf("the small example's configuration: %v", err)
	}
	if _, err := costmap.New(cfg, aiservicev1.File_aiservice_v1_aiservice_proto.Services().Get(0)); err != nil {
		t.Fatalf("the small example's configuration does not fit the example service: %v", err)
	}
}

// TestNegativeMaxTokens checks what the README says of a report asked with
// max_tokens -1: its estimate (prompt + max_tokens) is still positive, so
// it reaches the handler, which refuses it with invalid_argument; its fixed
// cost (one generate_requests) is kept, its estimate refunded.
func TestNegativeMaxTokens(t *testing.T) {
	t.Parallel()
	ex := start(t)
	const key = "demo-key-bob"
	stream := ex.generateReport(t.Context(), t, key, "a topic", -1)
	for stream.Receive() {
		t.Fatal("a report with max_tokens -1 sent a message")
	}
	if connect.CodeOf(stream.Err()) != connect.CodeInvalidArgument {
		t.Fatalf("err = %v, want invalid_argument", stream.Err())
	}
	buckets, _ := ex.getQuota(t, key)
	for name, want := range map[string]float64{"generate_requests": freeRequests - 1, "generate_tokens": freeTokens, "all_ai_tokens": freeAITokens} {
		// Refill may only have added a little since.
		if got := buckets[name].GetRemaining(); got < want-1e-6 || got > want+1 {
			t.Errorf("%s: %v remaining, want %v", name, got, want)
		}
	}
}
