package main

import (
	"bytes"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestQuick runs the whole program in its -quick mode with tiny cells, so
// that CI checks it still builds and runs (its figures mean nothing), and
// checks that every peer and section reached the table.
func TestQuick(t *testing.T) {
	var stdout, stderr bytes.Buffer
	began := time.Now()
	err := run(t.Context(), []string{"-quick", "-duration", "100ms", "-identities", "300", "-users", "300"}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("run: %v\nits log:\n%s", err, stderr.String())
	}
	t.Logf("took %v; the table:\n%s", time.Since(began).Round(time.Millisecond), stdout.String())
	out := stdout.String()
	for _, want := range []string{
		"| section ",
		"| Redis ", "| in-process ", "| ceiling ", "| Redis memory ", "| heap memory ", "| end to end ",
		"| " + peerRedisStore + " ", "| " + peerDenyCache + " ", "| " + peerRedisRate + " ", "| " + peerTextbook + " ", "| " + peerMemStore + " ", "| " + peerXRate + " ",
		"| redis-benchmark ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the output has no %q", strings.TrimSpace(want))
		}
	}
	if strings.Contains(out, "redis-benchmark failed") {
		t.Errorf("redis-benchmark failed; the log:\n%s", stderr.String())
	}
}

// TestParseFlags checks -only and -quick.
func TestParseFlags(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name         string
		args         []string
		wantPeers    []string
		wantSections []string
		wantDuration time.Duration
		wantErr      bool
	}{
		{name: "defaults", wantPeers: allPeers, wantSections: allSections, wantDuration: 2 * time.Second},
		{name: "quick", args: []string{"-quick"}, wantPeers: allPeers, wantSections: allSections, wantDuration: 200 * time.Millisecond},
		{name: "quick keeps a given duration", args: []string{"-quick", "-duration", "1s"}, wantPeers: allPeers, wantSections: allSections, wantDuration: time.Second},
		{
			name: "only", args: []string{"-only", "memstore,xrate,throughput"},
			wantPeers: []string{peerMemStore, peerXRate}, wantSections: []string{sectionThroughput}, wantDuration: 2 * time.Second,
		},
		{name: "unknown name", args: []string{"-only", "nope"}, wantErr: true},
		{name: "bad callers", args: []string{"-callers", "1,x"}, wantErr: true},
		{name: "more callers than users", args: []string{"-callers", "16", "-users", "8"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			o, err := parseFlags(tt.args, &bytes.Buffer{})
			if tt.wantErr {
				if err == nil {
					t.Fatal("parseFlags succeeded, want an error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(o.peers, ",") != strings.Join(tt.wantPeers, ",") || strings.Join(o.sections, ",") != strings.Join(tt.wantSections, ",") {
				t.Errorf("peers %v, sections %v; want %v, %v", o.peers, o.sections, tt.wantPeers, tt.wantSections)
			}
			if o.duration != tt.wantDuration {
				t.Errorf("duration %v, want %v", o.duration, tt.wantDuration)
			}
		})
	}
}

// TestHistogram checks that quantiles land within the buckets' 3%.
func TestHistogram(t *testing.T) {
	t.Parallel()
	var h histogram
	for i := 1; i <= 10_000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
	}
	for _, tt := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 5 * time.Millisecond}, {0.99, 9900 * time.Microsecond}, {1, 10 * time.Millisecond}} {
		got := h.quantile(tt.q)
		if diff := float64(got-tt.want) / float64(tt.want); diff < -0.035 || diff > 0.035 {
			t.Errorf("quantile(%v) = %v, want %v within 3.5%%", tt.q, got, tt.want)
		}
	}
	for i := range bucketOf(math.MaxInt64) + 1 {
		lo, hi := bucketBounds(i)
		if bucketOf(lo) != i || bucketOf(hi) != i {
			t.Fatalf("bucket %d: bounds [%d, %d] map to %d and %d", i, lo, hi, bucketOf(lo), bucketOf(hi))
		}
	}
}

func TestInTurn(t *testing.T) {
	peers := []string{"a", "b", "c"}
	for _, tc := range []struct {
		run  int
		want []string
	}{
		{0, []string{"a", "b", "c"}},
		{1, []string{"c", "b", "a"}},
		{2, []string{"a", "b", "c"}},
	} {
		if got := inTurn(peers, tc.run); !slices.Equal(got, tc.want) {
			t.Errorf("inTurn(%v, %d) = %v, want %v", peers, tc.run, got, tc.want)
		}
	}
	if !slices.Equal(peers, []string{"a", "b", "c"}) {
		t.Errorf("inTurn changed its argument: %v", peers)
	}
}

func TestCellResultAdd(t *testing.T) {
	a := &cellResult{ops: 3, allowed: 2, denied: 1, elapsed: time.Second, mallocs: 10, cpu: time.Millisecond}
	a.hist.record(time.Millisecond)
	b := &cellResult{ops: 5, allowed: 1, denied: 2, errs: 2, elapsed: 3 * time.Second, mallocs: 6, cpu: 2 * time.Millisecond, firstErr: errors.New("b")}
	b.hist.record(time.Second)
	a.add(b)
	if a.ops != 8 || a.allowed != 3 || a.denied != 3 || a.errs != 2 || a.elapsed != 4*time.Second || a.mallocs != 16 || a.cpu != 3*time.Millisecond || a.hist.n != 2 {
		t.Errorf("sum: %+v", a)
	}
	if a.firstErr == nil || a.firstErr.Error() != "b" {
		t.Errorf("firstErr = %v, want b's", a.firstErr)
	}
	if got := a.rate(); got != 2 {
		t.Errorf("rate = %v, want 2", got)
	}
}
