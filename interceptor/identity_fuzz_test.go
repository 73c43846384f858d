package interceptor_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/connectlimit/connectlimit/interceptor"
)

// maxSubjectBytes bounds a subject: "user:" and a 128-byte verbatim value.
const maxSubjectBytes = 140

// FuzzSubject checks [interceptor.Identity.Subject] on arbitrary
// identities: a subject is never empty, at most maxSubjectBytes of
// printable ASCII without spaces, and starts with "key:", "user:" or "ip:"
// by the precedence API key > user > IP. Different API keys (and different
// users) get different subjects, a value is kept verbatim or replaced by a
// "#" hash that no verbatim value equals, the tier and the IPv6 zone never
// matter, and IPv6 clients share a subject exactly when they share a /64.
//
// The fuzzer gives an identity (apiKey, user, ip as 4 or 16 bytes, zone,
// tier), a second API key and user to compare with, and which bit of the
// IP to flip for a neighbouring client. The seeds in
// testdata/fuzz/FuzzSubject are named after what they exercise.
func FuzzSubject(f *testing.F) {
	f.Fuzz(func(t *testing.T, apiKey, user string, ip []byte, zone, tier, otherKey, otherUser string, bit uint8) {
		addr, _ := netip.AddrFromSlice(ip)
		if addr.Is6() {
			addr = addr.WithZone(zone)
		}
		id := interceptor.Identity{APIKey: apiKey, User: user, IP: addr, Tier: tier}
		got := checkSubject(t, id)

		wantPrefix, value := "ip:", ""
		switch {
		case apiKey != "":
			wantPrefix, value = "key:", apiKey
		case user != "":
			wantPrefix, value = "user:", user
		}
		if !strings.HasPrefix(got, wantPrefix) {
			t.Fatalf("Subject of %#v = %q, want the prefix %q", id, got, wantPrefix)
		}
		if value != "" {
			checkValue(t, value, strings.TrimPrefix(got, wantPrefix))
		}

		// The tier never matters, nor do lower-precedence fields.
		same := []interceptor.Identity{{APIKey: apiKey, User: user, IP: addr}}
		if apiKey != "" {
			same = append(same, interceptor.Identity{APIKey: apiKey, User: otherUser})
		}
		if apiKey == "" && user != "" {
			same = append(same, interceptor.Identity{User: user, Tier: otherKey})
		}
		for _, other := range same {
			if s := other.Subject(); s != got {
				t.Fatalf("Subject of %#v = %q, but of %#v = %q", id, got, other, s)
			}
		}

		checkDistinct(t, func(s string) interceptor.Identity { return interceptor.Identity{APIKey: s} }, apiKey, otherKey)
		checkDistinct(t, func(s string) interceptor.Identity { return interceptor.Identity{User: s} }, user, otherUser)
		// An API key and a user of the same name are different subjects.
		if apiKey != "" {
			if k, u := (interceptor.Identity{APIKey: apiKey}).Subject(), (interceptor.Identity{User: apiKey}).Subject(); k == u {
				t.Fatalf("API key and user %q share the subject %q", apiKey, k)
			}
		}
		if apiKey == "" && user == "" {
			checkIP(t, addr, bit)
		}
	})
}

// checkSubject returns id's subject after checking that it is stable,
// non-empty, bounded and printable ASCII without spaces.
func checkSubject(t *testing.T, id interceptor.Identity) string {
	t.Helper()
	s := id.Subject()
	if s == "" || len(s) > maxSubjectBytes {
		t.Fatalf("Subject of %#v = %q: %d bytes, want 1 to %d", id, s, len(s), maxSubjectBytes)
	}
	for i := range len(s) {
		if s[i] < 0x21 || s[i] > 0x7e {
			t.Fatalf("Subject of %#v = %q: byte %d is %#x, want printable ASCII", id, s, i, s[i])
		}
	}
	if again := id.Subject(); again != s {
		t.Fatalf("Subject of %#v is %q, then %q", id, s, again)
	}
	return s
}

// checkValue checks how a subject holds value: verbatim if it is short
// printable ASCII that cannot be taken for a hash, else as "#" and a hash.
func checkValue(t *testing.T, value, got string) {
	t.Helper()
	verbatim := len(value) <= 128 && !strings.ContainsFunc(value, func(r rune) bool { return r < 0x21 || r > 0x7e || r == '#' })
	switch {
	case verbatim && got != value:
		t.Fatalf("value %q is kept as %q, want it verbatim", value, got)
	case !verbatim && (len(got) < 2 || got[0] != '#' || strings.Contains(got[1:], "#")):
		t.Fatalf("value %q is kept as %q, want it hashed: \"#\" and a hash", value, got)
	case !verbatim:
		// A verbatim value never looks like a hash: one spelled like this
		// hash is hashed in turn.
		for _, id := range []interceptor.Identity{{APIKey: got}, {User: got}} {
			if s := id.Subject(); strings.HasSuffix(s, ":"+got) {
				t.Fatalf("the hash %q of %q is kept verbatim in %q", got, value, s)
			}
		}
	}
}

// checkDistinct checks that two different non-empty values give different
// subjects.
func checkDistinct(t *testing.T, identity func(string) interceptor.Identity, a, b string) {
	t.Helper()
	if a == "" || b == "" || a == b {
		return
	}
	if sa, sb := identity(a).Subject(), identity(b).Subject(); sa == sb {
		t.Fatalf("%q and %q share the subject %q", a, b, sa)
	}
}

// checkIP checks the subject of an anonymous caller at addr against that of
// its neighbour, addr with one bit flipped: IPv4 clients (mapped or not)
// each have their own subject, IPv6 clients one per /64, and an identity
// without an address is "ip:unknown".
func checkIP(t *testing.T, addr netip.Addr, bit uint8) {
	t.Helper()
	got := (interceptor.Identity{IP: addr}).Subject()
	if !addr.IsValid() {
		if got != "ip:unknown" {
			t.Fatalf("Subject without an address = %q, want ip:unknown", got)
		}
		return
	}
	if s := (interceptor.Identity{IP: addr.WithZone("")}).Subject(); s != got {
		t.Fatalf("the zone of %v changes its subject from %q to %q", addr, s, got)
	}
	raw := addr.AsSlice()
	i := int(bit) % (8 * len(raw))
	raw[i/8] ^= 0x80 >> (i % 8)
	neighbour, _ := netip.AddrFromSlice(raw)
	other := (interceptor.Identity{IP: neighbour}).Subject()
	// Two clients share a subject only if both are native IPv6 (not mapped
	// IPv4) in the same /64: the flipped bit is past the 64th.
	native := addr.Is6() && !addr.Is4In6() && neighbour.Is6() && !neighbour.Is4In6()
	if wantSame := native && i >= 64; (got == other) != wantSame {
		t.Fatalf("%v and %v (bit %d flipped) have subjects %q and %q; want them equal: %v", addr, neighbour, i, got, other, wantSame)
	}
	if mapped := netip.AddrFrom16(addr.As16()); addr.Is4() {
		if s := (interceptor.Identity{IP: mapped}).Subject(); s != got {
			t.Fatalf("%v has the subject %q, but mapped as %v it has %q", addr, got, mapped, s)
		}
	}
}
