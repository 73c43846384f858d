package limiter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/netip"
	"strings"
)

// maxVerbatim is the longest identity value used verbatim in a subject;
// longer or unusual values are hashed so that subjects stay short whatever
// a caller sends.
const maxVerbatim = 128

// Identity is who a call is charged to. Buckets are kept per subject, and the
// subject is the most specific part that is set: the API key, else the
// user, else the client IP.
type Identity struct {
	// APIKey identifies the API key the call was made with. Use a stable
	// key ID or a hash, not the secret itself: it appears in QuotaFailure
	// details and store keys.
	APIKey string
	// User identifies an authenticated user.
	User string
	// IP is the client's address, used for anonymous calls. IPv6 clients
	// are limited per /64, the block one subscriber usually holds.
	IP netip.Addr
	// Tier selects the limits that apply, for example "free" or "pro"
	// (see [costmap.Config]). Empty means "anonymous" for callers known
	// only by IP, and the configuration's default tier for others.
	Tier string
}

// Subject returns the name the identity's buckets are kept under:
// "key:<APIKey>", "user:<User>" or "ip:<address>". A value longer than 128
// bytes, or with bytes other than printable ASCII, is replaced by
// "#<sha-256 prefix>" so a subject is bounded and printable. An identity with
// nothing set is "ip:unknown".
func (id Identity) Subject() string {
	switch {
	case id.APIKey != "":
		return "key:" + bounded(id.APIKey)
	case id.User != "":
		return "user:" + bounded(id.User)
	case id.IP.Is6() && !id.IP.Is4In6():
		p, _ := id.IP.Prefix(64) // Prefix fails only for an invalid address.
		var buf [64]byte         // "ip:" and the longest prefix, without allocating
		return string(p.AppendTo(append(buf[:0], "ip:"...)))
	case id.IP.IsValid():
		var buf [64]byte
		return string(id.IP.Unmap().AppendTo(append(buf[:0], "ip:"...)))
	default:
		return "ip:unknown"
	}
}

// bounded returns s if it is short printable ASCII without '#', else a
// hash of it marked with '#', so the two forms never collide.
func bounded(s string) string {
	if len(s) <= maxVerbatim && !strings.ContainsFunc(s, func(r rune) bool { return r < 0x21 || r > 0x7e || r == '#' }) {
		return s
	}
	sum := sha256.Sum256([]byte(s))
	return "#" + hex.EncodeToString(sum[:16])
}

type identityKey struct{}

// ContextWithIdentity returns a context carrying id, for authentication
// middleware to tell the limiter who the caller is.
func ContextWithIdentity(ctx context.Context, id Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// IdentityFromContext returns the identity stored by [ContextWithIdentity],
// and reports false if the context holds none. (The interceptor packages
// also read connectrpc.com/authn's info.)
func IdentityFromContext(ctx context.Context) (Identity, bool) {
	id, ok := ctx.Value(identityKey{}).(Identity)
	return id, ok
}

// defaultIdentity is the identity stored with ContextWithIdentity, if any;
// the limiter fills in the client IP.
func defaultIdentity(ctx context.Context, _ *CallInfo) (Identity, error) {
	id, _ := IdentityFromContext(ctx)
	return id, nil
}

// ClientIP returns the address of the client of a call from peerAddr (a
// peer's "host:port") and its request headers: the peer, or, when the peer
// is one of the trusted proxies, the rightmost X-Forwarded-For entry that
// is not a trusted proxy. Entries left of an unparsable one are not trusted
// to be genuine, so the walk stops there. It returns the zero Addr when
// peerAddr is not an address. The interceptor identifies anonymous callers
// with it; the server package limits failed authentications with it.
func ClientIP(peerAddr string, header Header, trusted []netip.Prefix) netip.Addr {
	ip := parseIP(peerAddr)
	if !ip.IsValid() || !isTrusted(ip, trusted) {
		return ip
	}
	hops := header.Values("X-Forwarded-For")
	for i := len(hops) - 1; i >= 0; i-- {
		entries := strings.Split(hops[i], ",")
		for j := len(entries) - 1; j >= 0; j-- {
			hop := parseIP(strings.TrimSpace(entries[j]))
			if !hop.IsValid() {
				return ip
			}
			ip = hop
			if !isTrusted(hop, trusted) {
				return hop
			}
		}
	}
	return ip
}

func parseIP(s string) netip.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap()
	}
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		return a.Unmap()
	}
	return netip.Addr{}
}

func isTrusted(ip netip.Addr, trusted []netip.Prefix) bool {
	for _, p := range trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
