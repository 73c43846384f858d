package redisstore

import (
	"crypto/sha256"
	"encoding/base64"
)

// maxVerbatim is the longest name used as is in a key. Longer names are
// hashed, so that no caller can grow keys without bound.
const maxVerbatim = 64

// hashMarker starts every hashed name. It is outside the verbatim
// character set, so a hashed name never equals a verbatim one.
const hashMarker = "#"

// hashBytes is how much of the SHA-256 a hashed name keeps: 144 bits, far
// beyond any birthday bound, and a whole number of base64 characters (24).
const hashBytes = 18

// Every key is "<prefix>:{<subject>}", alone or followed by a separator
// that says what it holds and the rest of its name, all escaped. The
// subject is the hash tag, so all keys of one subject share a Cluster slot,
// and since an escaped prefix or subject has no braces, the first "{" and
// "}" delimit it: keys that differ in prefix, subject, kind or name never
// coincide.
const (
	// idSep follows the subject in a request ID's marker key. Nothing
	// follows it in a bucket hash's key.
	idSep = "}~id:"
	// leaseSep follows the subject in a lease set's key. It differs from
	// idSep right after the "~".
	leaseSep = "}~lease:"
)

// bucketsKey returns the key of the hash of one subject's buckets from its
// already escaped parts. Its fields are the escaped bucket names.
//
// The previous storage format, one string "<tokens> <instant>" per bucket,
// used the keys "<prefix>:{<subject>}:<bucket>": no key of this format
// equals one of those, so a Store ignores them, and they expire on their
// own TTLs.
func bucketsKey(prefix, subject string) string {
	return string(appendBucketsKey(nil, prefix, subject))
}

// appendBucketsKey appends bucketsKey(prefix, subject) to b.
func appendBucketsKey(b []byte, prefix, subject string) []byte {
	return append(append(append(append(b, prefix...), ":{"...), subject...), '}')
}

// idKey returns the marker key of one request ID from its already escaped
// parts.
func idKey(prefix, subject, id string) string {
	return string(appendIDKey(nil, prefix, subject, id))
}

// appendIDKey appends idKey(prefix, subject, id) to b.
func appendIDKey(b []byte, prefix, subject, id string) []byte {
	return append(append(append(append(append(b, prefix...), ":{"...), subject...), idSep...), id...)
}

// leaseKey returns the key of the lease set of one subject and lease name
// from their already escaped parts.
func leaseKey(prefix, subject, name string) string {
	return prefix + ":{" + subject + leaseSep + name
}

// escape returns s if it is short and made only of characters that cannot
// break the key format, and otherwise a fixed-length hash of it.
func escape(s string) string {
	if len(s) <= maxVerbatim && verbatim(s) {
		return s
	}
	sum := sha256.Sum256([]byte(s))
	return hashMarker + base64.RawURLEncoding.EncodeToString(sum[:hashBytes])
}

// verbatim reports whether every byte of s is in [A-Za-z0-9._@=:-].
func verbatim(s string) bool {
	for i := range len(s) {
		switch b := s[i]; {
		case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9':
		case b == '.', b == '_', b == '@', b == '=', b == '-', b == ':':
		default:
			return false
		}
	}
	return true
}
