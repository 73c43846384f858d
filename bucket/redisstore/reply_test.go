package redisstore

import (
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/connectlimit/connectlimit/bucket"
)

func TestParseReply(t *testing.T) {
	t.Parallel()
	// Buckets of 10 tokens refilling at 1 token per second, read at 1 s:
	// a bucket whose empty instant is E µs holds (1e6 - E) / 1e6 tokens, at
	// most 10.
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	for _, tc := range []struct {
		name        string
		reply       any
		n           int
		wantVerdict verdict
		wantLevels  []float64
		wantErr     string
	}{
		{name: "applied", reply: []any{int64(1), "1000000 -50000023 =1250000"}, n: 2, wantVerdict: applied, wantLevels: []float64{1.5, -0.25}},
		{name: "denied", reply: []any{int64(0), "1000000 90000023"}, n: 1, wantVerdict: denied, wantLevels: []float64{0.1}},
		{name: "duplicate", reply: []any{int64(2), "1000000 400000023 - =-1e+300"}, n: 3, wantVerdict: duplicate, wantLevels: []float64{-3, 10, 10}},
		{name: "full", reply: []any{int64(1), "1000000 -"}, n: 1, wantVerdict: applied, wantLevels: []float64{10}},
		{name: "refilled beyond capacity", reply: []any{int64(1), "1000000 -2000000000023"}, n: 1, wantVerdict: applied, wantLevels: []float64{10}},
		{name: "class digits only", reply: []any{int64(1), "1000000 523"}, n: 1, wantVerdict: applied, wantLevels: []float64{0.999995}},
		{name: "debt beyond float range", reply: []any{int64(1), "1000000 =inf"}, n: 1, wantVerdict: applied, wantLevels: []float64{math.Inf(-1)}},
		{name: "too short", reply: []any{int64(1)}, n: 1, wantErr: "1 elements, want 2"},
		{name: "too long", reply: []any{int64(1), "1", "2"}, n: 1, wantErr: "3 elements, want 2"},
		{name: "verdict not integer", reply: []any{"1", "1 -"}, n: 1, wantErr: "verdict is string"},
		{name: "verdict out of range", reply: []any{int64(3), "1 -"}, n: 1, wantErr: "verdict is int64 3"},
		{name: "verdict negative", reply: []any{int64(-1), "1 -"}, n: 1, wantErr: "verdict is int64 -1"},
		{name: "state truncated to integer", reply: []any{int64(1), int64(3)}, n: 1, wantErr: "bucket state is int64"},
		{name: "no present", reply: []any{int64(1), "-"}, n: 1, wantErr: `bucket state "-", want the present and 1 buckets`},
		{name: "present not a number", reply: []any{int64(1), "x -"}, n: 1, wantErr: `want the present`},
		{name: "present NaN", reply: []any{int64(1), "nan -"}, n: 1, wantErr: `want the present`},
		{name: "too few buckets", reply: []any{int64(1), "1 - -"}, n: 3, wantErr: `bucket state "1 - -", want the present and 3 buckets`},
		{name: "too many buckets", reply: []any{int64(1), "1 - -"}, n: 1, wantErr: `want the present and 1 buckets`},
		{name: "no buckets", reply: []any{int64(1), "1 "}, n: 1, wantErr: `bucket 0 is ""`},
		{name: "double space", reply: []any{int64(1), "1 -  -"}, n: 2, wantErr: "want the present and 2 buckets"},
		{name: "trailing space", reply: []any{int64(1), "1 - "}, n: 1, wantErr: "want the present and 1 buckets"},
		{name: "bucket not a number", reply: []any{int64(1), "1 - x"}, n: 2, wantErr: `bucket 1 is "x"`},
		{name: "bucket without class", reply: []any{int64(1), "1 12"}, n: 1, wantErr: `bucket 0 is "12"`},
		{name: "bucket with a fraction", reply: []any{int64(1), "1 123.5"}, n: 1, wantErr: `bucket 0 is "123.5"`},
		{name: "bucket NaN", reply: []any{int64(1), "1 =nan"}, n: 1, wantErr: `bucket 0 is "=nan"`},
		{name: "bucket minus infinity", reply: []any{int64(1), "1 =-inf"}, n: 1, wantErr: `bucket 0 is "=-inf"`},
		{name: "state nil", reply: []any{int64(0), nil}, n: 1, wantErr: "bucket state is <nil>"},
		{name: "not an array", reply: "OK", n: 1, wantErr: "string, want an array"},
		{name: "nil", reply: nil, n: 1, wantErr: "<nil>, want an array"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			levels := make([]float64, tc.n)
			charges := make([]bucket.Charge, tc.n)
			for i := range charges {
				charges[i].Limit = lim
			}
			got, err := parseReply(tc.reply, charges, levels)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseReply(%v) error = %v, want one containing %q", tc.reply, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseReply(%v): %v", tc.reply, err)
			}
			if got != tc.wantVerdict {
				t.Errorf("verdict = %v, want %v", got, tc.wantVerdict)
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

func TestParseLeaseReply(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name         string
		reply        any
		wantAcquired bool
		wantInUse    int
		wantErr      string
	}{
		{name: "acquired", reply: []any{int64(1), int64(3)}, wantAcquired: true, wantInUse: 3},
		{name: "denied", reply: []any{int64(0), int64(5)}, wantInUse: 5},
		{name: "released", reply: []any{int64(0), int64(0)}},
		{name: "too short", reply: []any{int64(1)}, wantErr: "1 elements, want 2"},
		{name: "too long", reply: []any{int64(1), int64(1), int64(1)}, wantErr: "3 elements, want 2"},
		{name: "flag not integer", reply: []any{"1", int64(1)}, wantErr: "acquired flag is string"},
		{name: "flag out of range", reply: []any{int64(2), int64(1)}, wantErr: "acquired flag is int64 2"},
		{name: "count not integer", reply: []any{int64(1), "1"}, wantErr: "in-use count is string"},
		{name: "acquired but none in use", reply: []any{int64(1), int64(0)}, wantErr: "in-use count is int64 0"},
		{name: "negative count", reply: []any{int64(0), int64(-1)}, wantErr: "in-use count is int64 -1"},
		{name: "nil count", reply: []any{int64(0), nil}, wantErr: "in-use count is <nil>"},
		{name: "not an array", reply: int64(1), wantErr: "int64, want an array"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			acquired, inUse, err := parseLeaseReply(tc.reply)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseLeaseReply(%v) error = %v, want one containing %q", tc.reply, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseLeaseReply(%v): %v", tc.reply, err)
			}
			if acquired != tc.wantAcquired || inUse != tc.wantInUse {
				t.Fatalf("parseLeaseReply(%v) = %v, %d; want %v, %d", tc.reply, acquired, inUse, tc.wantAcquired, tc.wantInUse)
			}
		})
	}
}

func TestKeyKindsAreDistinct(t *testing.T) {
	t.Parallel()
	// Whatever the names, once escaped, a bucket (its group key and field),
	// an ID marker and a lease set of the same or different subjects never
	// coincide, even when the names look like other keys' tails, and even
	// when every subject shares one group.
	names := []string{"a", "id:a", "lease:a", "~id:a", "}~id:a", ":a", "a:b", "}:a", "a}~lease:b", "{x}", "a/b", "/", "~", escape("x")}
	for _, groups := range []uint64{1, DefaultGroups} {
		seen := map[string]string{}
		for _, subj := range []string{"s", "s}", "s:", "s}~id:", "s}:", "s/a", "g", "g/0", "g:0", escape("s}")} {
			es := escape(subj)
			g := groupOf(es, groups)
			for _, name := range names {
				for kind, k := range map[string]string{
					"bucket": groupKey("p", g) + " " + field(es, escape(name)),
					"id":     idKey("p", g, es, escape(name)),
					"lease":  leaseKey("p", es, escape(name)),
				} {
					what := fmt.Sprintf("%s of subject %q named %q", kind, subj, name)
					if prev, ok := seen[k]; ok {
						t.Fatalf("%d groups: %s and %s share the place %q", groups, prev, what, k)
					}
					seen[k] = what
				}
			}
		}
	}
}

func TestField(t *testing.T) {
	t.Parallel()
	// A field joins the escaped subject and bucket name while that fits
	// in 64 bytes, and hashes the join otherwise, so that a group stays a
	// listpack whatever the names.
	long := strings.Repeat("x", maxVerbatim)
	for _, tc := range []struct {
		subject, name string
		want          string
	}{
		{"user:alice", "requests", "user:alice/requests"},
		{strings.Repeat("s", 31), strings.Repeat("b", 32), strings.Repeat("s", 31) + "/" + strings.Repeat("b", 32)},
		{strings.Repeat("s", 32), strings.Repeat("b", 32), ""},
		{long, long, ""},
		{long + "y", "{b}", escape(long+"y") + "/" + escape("{b}")},
	} {
		got := field(escape(tc.subject), escape(tc.name))
		if tc.want != "" && got != tc.want {
			t.Errorf("field(%q, %q) = %q, want %q", tc.subject, tc.name, got, tc.want)
		}
		if tc.want == "" && (len(got) != 1+24 || !strings.HasPrefix(got, hashMarker) || !verbatim(got[1:])) {
			t.Errorf("field(%q, %q) = %q, want %q and 24 base64url characters", tc.subject, tc.name, got, hashMarker)
		}
		if len(got) > maxField {
			t.Errorf("field(%q, %q) = %q: %d bytes, want at most %d", tc.subject, tc.name, got, len(got), maxField)
		}
	}
	if a, b := field("s", long), field("s"+long[:1], long[1:]); a == b {
		t.Errorf("two joins hash alike: %q", a)
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
