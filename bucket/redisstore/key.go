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

// key returns the key of one bucket from its already escaped parts. The
// subject is the hash tag, so all buckets of one subject share a Cluster
// slot, and since an escaped subject has no braces, the first "}" ends it:
// distinct (subject, bucket) pairs never share a key.
func key(prefix, subject, bucketName string) string {
	return prefix + ":{" + subject + "}:" + bucketName
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
