package redisstore

import (
	"strconv"
	"strings"
	"testing"
)

// maxEscapedBytes is the longest escaped name: a verbatim one, or "#" and
// 24 base64 characters.
const maxEscapedBytes = max(maxVerbatim, 1+24)

// maxKeyBytes is the longest key: three escaped names (prefix, subject and
// request ID or lease name), the longest separators and a group tag.
const maxKeyBytes = 3*maxEscapedBytes + len(":{") + len(leaseSep) + len(groupTagStart) + 20

// fuzzGroups is the number of groups FuzzKey spreads subjects over: few, so
// that two subjects often share a group and only their fields tell their
// buckets apart.
const fuzzGroups = 3

// FuzzKey checks where buckets, request ID markers and lease sets built from
// arbitrary names are stored, escaped as the Store escapes them: every key
// is bounded and holds exactly one "{" and one "}" around a valid, non-empty
// Redis Cluster hash tag (the group's, "g/<n>", for a bucket and a marker,
// so that all keys of one bucket request share a slot; the escaped subject
// for a lease set); every field is at most 64 bytes, without spaces (which
// batch.lua splits its arguments on); and places of different kinds,
// subjects or names never coincide, even when the names are spelled like
// other keys' parts.
//
// The fuzzer gives a prefix and two subjects and two names, which the
// target combines into 12 places. The seeds in testdata/fuzz/FuzzKey are
// named after what they exercise.
func FuzzKey(f *testing.F) {
	f.Fuzz(func(t *testing.T, prefix, subject, name, otherSubject, otherName string) {
		p := escape(prefix)
		checkEscaped(t, prefix, p)
		kinds := []struct {
			kind string
			// place returns the key, and for a bucket its field after a
			// space (which neither a key nor a field holds).
			place func(prefix, subject, name string) string
			tag   func(subject string) string
		}{
			{"bucket", func(prefix, subject, name string) string {
				f := field(subject, name)
				if len(f) > maxField || strings.Contains(f, " ") {
					t.Fatalf("field %q of subject %q and bucket %q: want at most %d bytes and no spaces", f, subject, name, maxField)
				}
				return groupKey(prefix, groupOf(subject, fuzzGroups)) + " " + f
			}, fuzzGroupTag},
			{"id", func(prefix, subject, name string) string {
				return idKey(prefix, groupOf(subject, fuzzGroups), subject, name)
			}, fuzzGroupTag},
			{"lease", leaseKey, func(subject string) string { return subject }},
		}
		type built struct{ kind, subject, name, place string }
		var places []built
		for _, subj := range []string{subject, otherSubject} {
			for _, n := range []string{name, otherName} {
				es, en := escape(subj), escape(n)
				checkEscaped(t, subj, es)
				checkEscaped(t, n, en)
				for _, k := range kinds {
					got := k.place(p, es, en)
					key, _, _ := strings.Cut(got, " ")
					checkKey(t, key, k.tag(es))
					places = append(places, built{k.kind, subj, n, got})
				}
			}
		}
		for i, a := range places {
			for _, b := range places[i+1:] {
				same := a.kind == b.kind && a.subject == b.subject && a.name == b.name
				if (a.place == b.place) != same {
					t.Fatalf("%s of subject %q named %q is at %q, %s of subject %q named %q is at %q",
						a.kind, a.subject, a.name, a.place, b.kind, b.subject, b.name, b.place)
				}
			}
		}
	})
}

// fuzzGroupTag is the hash tag of an escaped subject's group in FuzzKey.
func fuzzGroupTag(subject string) string {
	return groupTagStart + strconv.FormatUint(groupOf(subject, fuzzGroups), 10)
}

// checkEscaped checks escape(s): bounded, free of the characters that
// delimit keys, and verbatim or a "#" hash, never both.
func checkEscaped(t *testing.T, s, escaped string) {
	t.Helper()
	if len(escaped) > maxEscapedBytes || (s != "" && escaped == "") {
		t.Fatalf("escape(%q) = %q: %d bytes, want 1 to %d", s, escaped, len(escaped), maxEscapedBytes)
	}
	if strings.ContainsAny(escaped, "{}~ /") {
		t.Fatalf("escape(%q) = %q holds a key delimiter", s, escaped)
	}
	if hashed := strings.HasPrefix(escaped, hashMarker); hashed == (escaped == s) {
		t.Fatalf("escape(%q) = %q: a value must be kept verbatim or hashed with %q", s, escaped, hashMarker)
	}
	if again := escape(s); again != escaped {
		t.Fatalf("escape(%q) is %q, then %q", s, escaped, again)
	}
}

// checkKey checks one key: bounded, with tag as its only hash tag.
func checkKey(t *testing.T, k, tag string) {
	t.Helper()
	if len(k) > maxKeyBytes {
		t.Fatalf("key %q is %d bytes, want at most %d", k, len(k), maxKeyBytes)
	}
	open, closing := strings.Index(k, "{"), strings.Index(k, "}")
	if strings.Count(k, "{") != 1 || strings.Count(k, "}") != 1 || open > closing {
		t.Fatalf("key %q must hold one \"{\" and then one \"}\"", k)
	}
	// An empty subject (which no request has) makes an empty tag.
	if got := k[open+1 : closing]; got != tag {
		t.Fatalf("key %q has the hash tag %q, want %q", k, got, tag)
	}
}
