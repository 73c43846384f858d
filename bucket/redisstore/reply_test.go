package redisstore

import (
	"math"
	"strings"
	"testing"
)

func TestParseReply(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		reply       []any
		n           int
		wantApplied bool
		wantLevels  []float64
		wantErr     string
	}{
		{name: "applied", reply: []any{int64(1), "2.5", "-0.25"}, n: 2, wantApplied: true, wantLevels: []float64{2.5, -0.25}},
		{name: "denied", reply: []any{int64(0), "0.10000000000000001"}, n: 1, wantLevels: []float64{0.1}},
		{name: "debt beyond float range", reply: []any{int64(1), "-inf"}, n: 1, wantApplied: true, wantLevels: []float64{math.Inf(-1)}},
		{name: "too short", reply: []any{int64(1)}, n: 1, wantErr: "1 elements, want 2"},
		{name: "too long", reply: []any{int64(1), "1", "2"}, n: 1, wantErr: "3 elements, want 2"},
		{name: "flag not integer", reply: []any{"1", "1"}, n: 1, wantErr: "applied flag is string"},
		{name: "flag out of range", reply: []any{int64(2), "1"}, n: 1, wantErr: "applied flag is int64 2"},
		{name: "level truncated to integer", reply: []any{int64(1), int64(3)}, n: 1, wantErr: "level 0 is int64"},
		{name: "level not a number", reply: []any{int64(1), "1", "x"}, n: 2, wantErr: `level 1 is "x"`},
		{name: "level NaN", reply: []any{int64(1), "nan"}, n: 1, wantErr: `level 0 is "nan"`},
		{name: "level nil", reply: []any{int64(0), nil}, n: 1, wantErr: "level 0 is <nil>"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			applied, levels, err := parseReply(tc.reply, tc.n)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseReply(%v) error = %v, want one containing %q", tc.reply, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseReply(%v): %v", tc.reply, err)
			}
			if applied != tc.wantApplied {
				t.Errorf("applied = %v, want %v", applied, tc.wantApplied)
			}
			if len(levels) != len(tc.wantLevels) {
				t.Fatalf("levels = %v, want %v", levels, tc.wantLevels)
			}
			for i := range levels {
				if levels[i] != tc.wantLevels[i] {
					t.Errorf("levels[%d] = %v, want %v", i, levels[i], tc.wantLevels[i])
				}
			}
		})
	}
}

func TestEscape(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("x", maxVerbatim)
	for _, tc := range []struct {
		name         string
		in           string
		wantVerbatim bool
	}{
		{"empty", "", true},
		{"typical subject", "user:alice", true},
		{"every safe character", "azAZ09._@=-:", true},
		{"longest verbatim", long, true},
		{"one byte too long", long + "x", false},
		{"open brace", "a{b", false},
		{"close brace", "a}b", false},
		{"hash marker", "#abc", false},
		{"space", "a b", false},
		{"NUL", "a\x00b", false},
		{"newline", "a\nb", false},
		{"slash", "a/b", false},
		{"UTF-8", "日本語", false},
		{"invalid UTF-8", "\xff\xfe", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := escape(tc.in)
			if tc.wantVerbatim {
				if got != tc.in {
					t.Fatalf("escape(%q) = %q, want it unchanged", tc.in, got)
				}
				return
			}
			if len(got) != 1+24 || !strings.HasPrefix(got, hashMarker) || !verbatim(got[1:]) {
				t.Fatalf("escape(%q) = %q, want %q and 24 base64url characters", tc.in, got, hashMarker)
			}
			if escape(tc.in) != got {
				t.Fatalf("escape(%q) is not deterministic", tc.in)
			}
		})
	}
}
