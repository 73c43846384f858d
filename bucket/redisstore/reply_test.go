package redisstore

import (
	"errors"
	"fmt"
	"math"
	"slices"
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
		reply       string
		n           int
		wantVerdict verdict
		wantLevels  []float64
		wantErr     string
	}{
		{name: "applied", reply: "1 1000000 -50000023 =1250000", n: 2, wantVerdict: applied, wantLevels: []float64{1.5, -0.25}},
		{name: "denied", reply: "0 1000000 90000023", n: 1, wantVerdict: denied, wantLevels: []float64{0.1}},
		{name: "duplicate", reply: "2 1000000 400000023 - =-1e+300", n: 3, wantVerdict: duplicate, wantLevels: []float64{-3, 10, 10}},
		{name: "full", reply: "1 1000000 -", n: 1, wantVerdict: applied, wantLevels: []float64{10}},
		{name: "refilled beyond capacity", reply: "1 1000000 -2000000000023", n: 1, wantVerdict: applied, wantLevels: []float64{10}},
		{name: "class digits only", reply: "1 1000000 523", n: 1, wantVerdict: applied, wantLevels: []float64{0.999995}},
		{name: "debt beyond float range", reply: "1 1000000 =inf", n: 1, wantVerdict: applied, wantLevels: []float64{math.Inf(-1)}},
		{name: "empty", reply: "", n: 1, wantErr: `"", want a verdict`},
		{name: "verdict alone", reply: "1", n: 1, wantErr: `"1", want a verdict`},
		{name: "verdict out of range", reply: "3 1 -", n: 1, wantErr: `"3 1 -", want a verdict`},
		{name: "verdict negative", reply: "-1 1 -", n: 1, wantErr: "want a verdict"},
		{name: "verdict of two digits", reply: "01 1 -", n: 1, wantErr: "want a verdict"},
		{name: "no state", reply: "1 ", n: 1, wantErr: `bucket state "", want the present and 1 buckets`},
		{name: "no present", reply: "1 -", n: 1, wantErr: `bucket state "-", want the present and 1 buckets`},
		{name: "present not a number", reply: "1 x -", n: 1, wantErr: `want the present`},
		{name: "present NaN", reply: "1 nan -", n: 1, wantErr: `want the present`},
		{name: "too few buckets", reply: "1 1 - -", n: 3, wantErr: `bucket state "1 - -", want the present and 3 buckets`},
		{name: "too many buckets", reply: "1 1 - -", n: 1, wantErr: `want the present and 1 buckets`},
		{name: "no buckets", reply: "1 1 ", n: 1, wantErr: `bucket 0 is ""`},
		{name: "double space", reply: "1 1 -  -", n: 2, wantErr: "want the present and 2 buckets"},
		{name: "trailing space", reply: "1 1 - ", n: 1, wantErr: "want the present and 1 buckets"},
		{name: "bucket not a number", reply: "1 1 - x", n: 2, wantErr: `bucket 1 is "x"`},
		{name: "bucket without class", reply: "1 1 12", n: 1, wantErr: `bucket 0 is "12"`},
		{name: "bucket with a fraction", reply: "1 1 123.5", n: 1, wantErr: `bucket 0 is "123.5"`},
		{name: "bucket NaN", reply: "1 1 =nan", n: 1, wantErr: `bucket 0 is "=nan"`},
		{name: "bucket minus infinity", reply: "1 1 =-inf", n: 1, wantErr: `bucket 0 is "=-inf"`},
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
		reply        string
		wantAcquired bool
		wantInUse    int
		wantErr      string
	}{
		{name: "acquired", reply: "1 3", wantAcquired: true, wantInUse: 3},
		{name: "denied", reply: "0 5", wantInUse: 5},
		{name: "released", reply: "0 0"},
		{name: "empty", reply: "", wantErr: `"", want an acquired flag`},
		{name: "too short", reply: "1", wantErr: `"1", want an acquired flag`},
		{name: "too long", reply: "1 1 1", wantErr: `in-use count "1 1"`},
		{name: "flag not a number", reply: "x 1", wantErr: "want an acquired flag"},
		{name: "flag out of range", reply: "2 1", wantErr: "want an acquired flag"},
		{name: "count not a number", reply: "1 x", wantErr: `in-use count "x"`},
		{name: "acquired but none in use", reply: "1 0", wantErr: `in-use count "0", want an integer from 1`},
		{name: "negative count", reply: "0 -1", wantErr: `in-use count "-1"`},
		{name: "no count", reply: "0 ", wantErr: `in-use count ""`},
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

func TestSplitLines(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		text    string
		n       int
		want    []string
		wantErr string
	}{
		{text: "1 2 -", n: 1, want: []string{"1 2 -"}},
		{text: "1 2 -\n0 0\n!ERR x", n: 3, want: []string{"1 2 -", "0 0", "!ERR x"}},
		{text: "a\n\nb", n: 3, want: []string{"a", "", "b"}},
		{text: "a\nb", n: 3, wantErr: "2 lines for 3 operations"},
		{text: "", n: 2, wantErr: "1 lines for 2 operations"},
		{text: "a\nb", n: 1, wantErr: "more than 1 lines for 1 operations"},
		{text: "a\n", n: 1, wantErr: "more than 1 lines"},
	} {
		got, err := splitLines(tc.text, tc.n)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, bucket.ErrOutcomeUnknown) {
				t.Errorf("splitLines(%q, %d) error = %v, want ErrOutcomeUnknown and %q", tc.text, tc.n, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("splitLines(%q, %d) = %q, %v; want %q", tc.text, tc.n, got, err, tc.want)
		}
	}
}
