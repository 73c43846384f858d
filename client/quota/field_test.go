package quota

import (
	"errors"
	"reflect"
	"testing"
)

func TestParseField(t *testing.T) {
	t.Parallel()
	item := func(bucket string, kv ...any) fieldItem {
		it := fieldItem{bucket: bucket, params: map[string]int64{}}
		for i := 0; i < len(kv); i += 2 {
			it.params[kv[i].(string)] = int64(kv[i+1].(int)) //nolint:forcetypeassert // test table
		}
		return it
	}
	for _, tc := range []struct {
		name    string
		line    string
		want    []fieldItem
		wantErr bool
	}{
		{name: "connectlimit RateLimit", line: `"search";r=59;t=1, "all_ai_tokens";r=99;t=1`,
			want: []fieldItem{item("search", "r", 59, "t", 1), item("all_ai_tokens", "r", 99, "t", 1)}},
		{name: "empty field", line: "   ", want: nil},
		{name: "token name", line: `default;r=50;t=30`, want: []fieldItem{item("default", "r", 50, "t", 30)}},
		{name: "t is optional", line: `"a";r=0`, want: []fieldItem{item("a", "r", 0)}},
		{name: "tabs and spaces around commas", line: " \"a\";r=1 \t,\t \"b\";r=2 ",
			want: []fieldItem{item("a", "r", 1), item("b", "r", 2)}},
		{name: "space after a semicolon", line: `"a"; r=1;  t=2`, want: []fieldItem{item("a", "r", 1, "t", 2)}},
		{name: "escaped name", line: `"a\"b\\c";r=1`, want: []fieldItem{item(`a"b\c`, "r", 1)}},
		{name: "unknown parameters of every type are ignored",
			line: `"a";r=1;pk=:cHsdsRa894==:;qu="tokens";x=1.5;y=tok/en;z;b=?0;d=@1659578233;ds=%"caf%c3%a9";n=-3`,
			want: []fieldItem{item("a", "r", 1)}},
		{name: "last duplicate parameter wins", line: `"a";r=1;r=2`, want: []fieldItem{item("a", "r", 2)}},
		{name: "15 digits", line: `"a";r=999999999999999`, want: []fieldItem{item("a", "r", 999999999999999)}},

		{name: "16 digits", line: `"a";r=1000000000000000`, wantErr: true},
		{name: "required parameter missing", line: `"a";t=1`, wantErr: true},
		{name: "negative", line: `"a";r=-1`, wantErr: true},
		{name: "decimal", line: `"a";r=1.5`, wantErr: true},
		{name: "string value", line: `"a";r="1"`, wantErr: true},
		{name: "boolean value", line: `"a";r`, wantErr: true},
		{name: "integer name", line: `1;r=1`, wantErr: true},
		{name: "inner list", line: `("a" "b");r=1`, wantErr: true},
		{name: "bucket twice", line: `"a";r=1, "a";r=2`, wantErr: true},
		{name: "trailing comma", line: `"a";r=1,`, wantErr: true},
		{name: "empty member", line: `"a";r=1,,"b";r=2`, wantErr: true},
		{name: "unclosed string", line: `"a;r=1`, wantErr: true},
		{name: "bad escape", line: `"a\n";r=1`, wantErr: true},
		{name: "non-ASCII in string", line: "\"caf\u00e9\";r=1", wantErr: true},
		{name: "uppercase key", line: `"a";R=1`, wantErr: true},
		{name: "missing semicolon", line: `"a" r=1`, wantErr: true},
		{name: "garbage after item", line: `"a";r=1 x`, wantErr: true},
		{name: "bad base64", line: `"a";r=1;pk=:***:`, wantErr: true},
		{name: "decimal with 4 fraction digits", line: `"a";r=1;x=1.2345`, wantErr: true},
		{name: "bad boolean", line: `"a";r=1;b=?2`, wantErr: true},
		{name: "uppercase display escape", line: `"a";r=1;d=%"%C3%A9"`, wantErr: true},
		{name: "display string not UTF-8", line: `"a";r=1;d=%"%ff"`, wantErr: true},
		{name: "leading tab", line: "\t\"a\";r=1", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := parseField(tc.line, "r", "t")
			if tc.wantErr {
				if !errors.Is(err, errField) {
					t.Fatalf("parseField(%q) = %v, %v; want an error wrapping errField", tc.line, got, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseField(%q): %v", tc.line, err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("parseField(%q) = %+v, want %+v", tc.line, got, tc.want)
			}
		})
	}
}

// TestParseFieldBound refuses a field with more buckets than any server
// charges, so that a hostile server cannot grow the quota state with one
// header.
func TestParseFieldBound(t *testing.T) {
	t.Parallel()
	items := make([]fieldItem, maxFieldItems+1)
	for i := range items {
		items[i] = fieldItem{bucket: string(rune('a'+i%26)) + string(rune('a'+i/26)), params: map[string]int64{"r": 1}}
	}
	if _, err := parseField(formatField(items[:maxFieldItems]), "r"); err != nil {
		t.Fatalf("%d members: %v", maxFieldItems, err)
	}
	if _, err := parseField(formatField(items), "r"); err == nil {
		t.Fatalf("%d members: no error", maxFieldItems+1)
	}
}

// TestParseLines merges the lines of a field: an error's metadata holds
// the headers' line, then the trailers' newer one.
func TestParseLines(t *testing.T) {
	t.Parallel()
	item := func(bucket string, r int64) fieldItem {
		return fieldItem{bucket: bucket, params: map[string]int64{"r": r}}
	}
	for _, tc := range []struct {
		name  string
		lines []string
		want  []fieldItem
	}{
		{"none", nil, nil},
		{"a list split over two lines", []string{`"a";r=1`, `"b";r=2`}, []fieldItem{item("a", 1), item("b", 2)}},
		{"headers, then trailers", []string{`"requests";r=9, "tokens";r=96`, `"tokens";r=0`},
			[]fieldItem{item("requests", 9), item("tokens", 0)}},
		{"an invalid line is ignored", []string{`"a";r=1`, `"b";r=-2`, ``, `"c";r=3`}, []fieldItem{item("a", 1), item("c", 3)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := parseLines(tc.lines, "r"); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("parseLines(%q) = %+v, want %+v", tc.lines, got, tc.want)
			}
		})
	}
}
