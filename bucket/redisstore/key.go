package redisstore

import (
	"crypto/sha256"
	"encoding/base64"
	"strconv"
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

// A subject's buckets live in a group hash, "<prefix>:{g/<n>}", shared by
// every subject whose escaped name hashes to group n (see groupOf), under the
// field "<subject>/<bucket>" (see appendField). A request ID's marker key,
// "<prefix>:{g/<n>}~id:<subject>/<id>", shares its group's hash tag, so that
// every key of a bucket request is in one Cluster slot. A lease set keeps
// its subject as its tag: "<prefix>:{<subject>}~lease:<name>". An escaped
// prefix, subject or name has neither braces nor "/", so the first "{" and
// "}" delimit the tag, a group tag (which has a "/") never equals a subject,
// and what follows the "}" (nothing, "~id:" or "~lease:") says what the key
// holds: keys that differ in prefix, group, subject, kind or name never
// coincide.
const (
	// groupTagStart starts the hash tag of a group: "g/" and the group's
	// number in decimal follow the prefix's "{".
	groupTagStart = "g/"
	// idSep follows the group tag in a request ID's marker key. Nothing
	// follows it in a group hash's key.
	idSep = "}~id:"
	// leaseSep follows the subject in a lease set's key. It differs from
	// idSep right after the "~".
	leaseSep = "}~lease:"
	// fieldSep joins a subject and a bucket name (or a request ID) in a
	// field (or a marker key). No escaped name contains it.
	fieldSep = '/'
	// maxField is the longest field a group hash gets:
	// hash-max-listpack-value, by default, so that a group stays a
	// compact listpack. Longer joins are hashed.
	maxField = 64
)

// groupOf returns the group, from 0 to groups-1, of an escaped subject:
// the 64-bit FNV-1a hash of its bytes, mixed by MurmurHash3's 64-bit
// finalizer (FNV-1a's low bits alone spread names that differ in their
// last characters, such as "user:1" and "user:2", unevenly), modulo
// groups. It is part of the storage format: every Store sharing a Redis
// must compute the same one.
func groupOf(subject string, groups uint64) uint64 {
	h := uint64(14695981039346656037)
	for i := range len(subject) {
		h ^= uint64(subject[i])
		h *= 1099511628211
	}
	return mix(h) % groups
}

// mix is MurmurHash3's 64-bit finalizer, fmix64: every bit of its result
// depends on every bit of h.
func mix(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// appendGroupKey appends the key of group g's hash, "<prefix>:{g/<g>}", to
// b, from the escaped prefix.
func appendGroupKey(b []byte, prefix string, g uint64) []byte {
	b = append(append(append(b, prefix...), ":{"...), groupTagStart...)
	return append(strconv.AppendUint(b, g, 10), '}')
}

// appendIDKey appends the marker key of request ID id of subject, in
// group g, to b, from the escaped prefix, subject and id.
func appendIDKey(b []byte, prefix string, g uint64, subject, id string) []byte {
	b = append(append(append(b, prefix...), ":{"...), groupTagStart...)
	b = append(append(strconv.AppendUint(b, g, 10), idSep...), subject...)
	return append(append(b, fieldSep), id...)
}

// appendField appends the field of bucket name of subject (both escaped)
// to b: "<subject>/<name>" if that is at most maxField bytes, and
// otherwise "#" and the first 144 bits of its SHA-256 in unpadded
// base64url, 25 bytes. A joined field has a "/" and a hashed one has not,
// so they never coincide; since neither escaped part has a "/", the join
// is unambiguous.
func appendField(b []byte, subject, name string) []byte {
	if len(subject)+1+len(name) <= maxField {
		return append(append(append(b, subject...), fieldSep), name...)
	}
	var buf [2*(maxVerbatim+1) + 1]byte
	joined := append(append(append(buf[:0], subject...), fieldSep), name...)
	sum := sha256.Sum256(joined)
	return base64.RawURLEncoding.AppendEncode(append(b, hashMarker...), sum[:hashBytes])
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
