package limiter

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

func TestClientIP(t *testing.T) {
	t.Parallel()
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	for _, tc := range []struct {
		name string
		peer string
		xff  []string
		want string
	}{
		{"direct client", "203.0.113.7:5123", nil, "203.0.113.7"},
		{"untrusted peer's XFF is ignored", "203.0.113.7:5123", []string{"198.51.100.1"}, "203.0.113.7"},
		{"trusted proxy, one hop", "10.1.2.3:80", []string{"198.51.100.1"}, "198.51.100.1"},
		{"rightmost untrusted wins over spoofed left", "10.1.2.3:80", []string{"1.1.1.1, 198.51.100.1, 10.9.9.9"}, "198.51.100.1"},
		{"several header lines", "10.1.2.3:80", []string{"1.1.1.1", "198.51.100.2, 10.0.0.5"}, "198.51.100.2"},
		{"all hops trusted", "10.1.2.3:80", []string{"10.0.0.1, 10.0.0.2"}, "10.0.0.1"},
		{"garbage stops the walk", "10.1.2.3:80", []string{"1.1.1.1, not-an-ip, 10.0.0.2"}, "10.0.0.2"},
		{"trusted proxy without XFF", "10.1.2.3:80", nil, "10.1.2.3"},
		{"IPv6 peer", "[2001:db8::1]:443", nil, "2001:db8::1"},
		{"IPv4-mapped IPv6", "[::ffff:192.0.2.1]:443", nil, "192.0.2.1"},
		{"IPv6 trusted proxy", "[::1]:443", []string{"2001:db8::5"}, "2001:db8::5"},
		{"unparsable peer", "pipe", []string{"198.51.100.1"}, "invalid IP"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := http.Header{}
			for _, v := range tc.xff {
				h.Add("X-Forwarded-For", v)
			}
			if got := ClientIP(tc.peer, h, trusted).String(); got != tc.want {
				t.Fatalf("clientIP = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestSubject(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("a", maxVerbatim+1)
	for _, tc := range []struct {
		name string
		id   Identity
		want string
	}{
		{"API key first", Identity{APIKey: "k1", User: "alice", IP: netip.MustParseAddr("192.0.2.1")}, "key:k1"},
		{"then user", Identity{User: "alice", IP: netip.MustParseAddr("192.0.2.1")}, "user:alice"},
		{"then IPv4", Identity{IP: netip.MustParseAddr("192.0.2.1")}, "ip:192.0.2.1"},
		{"IPv6 per /64", Identity{IP: netip.MustParseAddr("2001:db8:1:2:3:4:5:6")}, "ip:2001:db8:1:2::/64"},
		{"mapped IPv4", Identity{IP: netip.MustParseAddr("::ffff:192.0.2.1")}, "ip:192.0.2.1"},
		{"nothing", Identity{}, "ip:unknown"},
		{"longest verbatim", Identity{User: long[:maxVerbatim]}, "user:" + long[:maxVerbatim]},
		{"too long is hashed", Identity{User: long}, "user:#c12cb024a2e5551cca0e08fce8f1c5e3"},
		{"space is hashed", Identity{User: "a b"}, "user:#"},
		{"hash marker is hashed", Identity{User: "#4ce9b2a3d6f76a9e0ed02a3f5b84da76"}, "user:#"},
		{"control bytes are hashed", Identity{APIKey: "k\x00\n"}, "key:#"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := tc.id.Subject()
			if strings.HasSuffix(tc.want, "#") {
				if !strings.HasPrefix(got, tc.want) || len(got) != len(tc.want)+32 {
					t.Fatalf("Subject = %q, want %q followed by 32 hex digits", got, tc.want)
				}
				return
			}
			if got != tc.want {
				t.Fatalf("Subject = %q, want %q", got, tc.want)
			}
		})
	}
	if a, b := (Identity{User: "#x"}).Subject(), (Identity{User: "x"}).Subject(); a == b {
		t.Fatal("a hashed and a verbatim user collide")
	}
}
