package redisstore

import (
	"strings"
	"testing"
)

// maxEscapedBytes is the longest escaped name: a verbatim one, or "#" and
// 24 base64 characters.
const maxEscapedBytes = max(maxVerbatim, 1+24)

// maxKeyBytes is the longest key: three escaped names (prefix, subject and
// bucket, request ID or lease name) and the longest separators.
const maxKeyBytes = 3*maxEscapedBytes + len(":{") + len(leaseSep)

// FuzzKey checks the keys of bucket hashes, request ID markers and lease
// sets built from arbitrary names, escaped as the Store escapes them: every
// key is bounded, holds exactly one "{" and one "}" with the escaped
// subject between them (a valid, non-empty Redis Cluster hash tag, so that
// all keys of one subject share a slot), and keys of different kinds,
// subjects or names never coincide, even when the names are spelled like
// other keys' parts; a subject's buckets share its one bucket hash, whose
// field names (the escaped bucket names) have no spaces.
//
// The fuzzer gives a prefix and two subjects and two names, which the
// target combines into 12 keys. The seeds in testdata/fuzz/FuzzKey are
// named after what they exercise.
func FuzzKey(f *testing.F) {
	f.Fuzz(func(t *testing.T, prefix, subject, name, otherSubject, otherName string) {
		p := escape(prefix)
		checkEscaped(t, prefix, p)
		kinds := []struct {
			kind string
			make func(prefix, subject, name string) string
		}{
			// A subject's buckets share one hash, whose fields are their
			// escaped names (checked by checkEscaped: no spaces, which
			// batch.lua splits its arguments on).
			{"bucket", func(prefix, subject, _ string) string { return bucketsKey(prefix, subject) }},
			{"id", idKey},
			{"lease", leaseKey},
		}
		type built struct{ kind, subject, name, key string }
		var keys []built
		for _, subj := range []string{subject, otherSubject} {
			for _, n := range []string{name, otherName} {
				es, en := escape(subj), escape(n)
				checkEscaped(t, subj, es)
				checkEscaped(t, n, en)
				for _, k := range kinds {
					got := k.make(p, es, en)
					checkKey(t, got, subj, es)
					keys = append(keys, built{k.kind, subj, n, got})
				}
			}
		}
		for i, a := range keys {
			for _, b := range keys[i+1:] {
				same := a.kind == b.kind && a.subject == b.subject && (a.name == b.name || a.kind == "bucket")
				if (a.key == b.key) != same {
					t.Fatalf("%s key of subject %q named %q is %q, %s key of subject %q named %q is %q",
						a.kind, a.subject, a.name, a.key, b.kind, b.subject, b.name, b.key)
				}
			}
		}
	})
}

// checkEscaped checks escape(s): bounded, free of the characters that
// delimit keys, and verbatim or a "#" hash, never both.
func checkEscaped(t *testing.T, s, escaped string) {
	t.Helper()
	if len(escaped) > maxEscapedBytes || (s != "" && escaped == "") {
		t.Fatalf("escape(%q) = %q: %d bytes, want 1 to %d", s, escaped, len(escaped), maxEscapedBytes)
	}
	if strings.ContainsAny(escaped, "{}~ ") {
		t.Fatalf("escape(%q) = %q holds a key delimiter", s, escaped)
	}
	if hashed := strings.HasPrefix(escaped, hashMarker); hashed == (escaped == s) {
		t.Fatalf("escape(%q) = %q: a value must be kept verbatim or hashed with %q", s, escaped, hashMarker)
	}
	if again := escape(s); again != escaped {
		t.Fatalf("escape(%q) is %q, then %q", s, escaped, again)
	}
}

// checkKey checks one key: bounded, with the escaped subject as its only
// hash tag.
func checkKey(t *testing.T, k, subject, escapedSubject string) {
	t.Helper()
	if len(k) > maxKeyBytes {
		t.Fatalf("key %q is %d bytes, want at most %d", k, len(k), maxKeyBytes)
	}
	open, closing := strings.Index(k, "{"), strings.Index(k, "}")
	if strings.Count(k, "{") != 1 || strings.Count(k, "}") != 1 || open > closing {
		t.Fatalf("key %q must hold one \"{\" and then one \"}\"", k)
	}
	if tag := k[open+1 : closing]; tag != escapedSubject || (subject != "" && tag == "") {
		t.Fatalf("key %q has the hash tag %q, want the escaped subject %q of %q", k, tag, escapedSubject, subject)
	}
}
