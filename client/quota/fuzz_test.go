package quota

import (
	"reflect"
	"strings"
	"testing"
)

// FuzzParseField checks that the RateLimit parser never panics, that what it
// accepts obeys its contract (unique buckets with printable ASCII names,
// the required parameter present, every read parameter a non-negative
// Integer of at most 15 digits), and that formatting what it parsed and
// parsing that again gives the same items. The seed corpus is in
// testdata/fuzz/FuzzParseField.
func FuzzParseField(f *testing.F) {
	for _, seed := range []string{
		`"search";r=59;t=1, "all_ai_tokens";r=99;t=1`,
		`"search";q=60;w=60`,
		`"generate_tokens";r=800;q=10000`,
		`default;r=50;t=30`,
		`"a";r=1;pk=:cHsdsRa894==:;qu="tokens";x=1.5;z;d=@1;ds=%"caf%c3%a9"`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, field string) {
		items, err := parseField(field, "r", "t")
		if err != nil {
			return
		}
		seen := map[string]bool{}
		for _, it := range items {
			if seen[it.bucket] {
				t.Fatalf("bucket %q listed twice in %+v", it.bucket, items)
			}
			seen[it.bucket] = true
			for i := range len(it.bucket) {
				if c := it.bucket[i]; c < 0x20 || c > 0x7e {
					t.Fatalf("bucket %q has byte %#x", it.bucket, c)
				}
			}
			if _, ok := it.params["r"]; !ok {
				t.Fatalf("bucket %q lacks r: %+v", it.bucket, it.params)
			}
			for k, v := range it.params {
				if (k != "r" && k != "t") || v < 0 || v > 999_999_999_999_999 {
					t.Fatalf("bucket %q: parameter %s=%d", it.bucket, k, v)
				}
			}
		}
		again, err := parseField(formatField(items), "r", "t")
		if err != nil {
			t.Fatalf("formatted %q does not parse: %v", formatField(items), err)
		}
		if len(items) == 0 && len(again) == 0 {
			return
		}
		if !reflect.DeepEqual(again, items) {
			t.Fatalf("round trip: %+v became %+v", items, again)
		}
	})
}

// FuzzParseLines checks that merging the lines of a field never panics and
// never lists a bucket twice or more than maxFieldItems buckets. Lines are
// split at newlines. The seed corpus is in testdata/fuzz/FuzzParseLines.
func FuzzParseLines(f *testing.F) {
	f.Add("\"requests\";r=9, \"tokens\";r=96\n\"tokens\";r=0")
	f.Fuzz(func(t *testing.T, field string) {
		items := parseLines(strings.Split(field, "\n"), "r", "t")
		if len(items) > maxFieldItems {
			t.Fatalf("%d buckets", len(items))
		}
		seen := map[string]bool{}
		for _, it := range items {
			if seen[it.bucket] {
				t.Fatalf("bucket %q listed twice", it.bucket)
			}
			seen[it.bucket] = true
		}
	})
}
