package interceptor

import (
	"context"
	"net/http"
	"net/netip"

	"connectrpc.com/authn"
	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/limiter"
)

// Identity is who a call is charged to; see [limiter.Identity].
type Identity = limiter.Identity

// ContextWithIdentity returns a context carrying id, for authentication
// middleware to tell the interceptor who the caller is.
func ContextWithIdentity(ctx context.Context, id Identity) context.Context {
	return limiter.ContextWithIdentity(ctx, id)
}

// IdentityFromContext returns the identity stored by [ContextWithIdentity].
// Failing that it reads connectrpc.com/authn's info ([authn.GetInfo]): an
// [Identity] or *Identity is used as is, a string is taken as the user, and
// a value with a method RateLimitIdentity() Identity is asked for it. It
// reports false if the context holds none of these.
func IdentityFromContext(ctx context.Context) (Identity, bool) {
	if id, ok := limiter.IdentityFromContext(ctx); ok {
		return id, true
	}
	switch info := authn.GetInfo(ctx).(type) {
	case Identity:
		return info, true
	case *Identity:
		if info != nil {
			return *info, true
		}
	case string:
		if info != "" {
			return Identity{User: info}, true
		}
	case interface{ RateLimitIdentity() Identity }:
		return info.RateLimitIdentity(), true
	}
	return Identity{}, false
}

func defaultIdentity(ctx context.Context, _ connect.Peer, _ http.Header) (Identity, error) {
	id, _ := IdentityFromContext(ctx)
	return id, nil
}

// ClientIP returns the address of the client of a call from peerAddr (a
// peer's "host:port") and its request headers: the peer, or, when the peer
// is one of the trusted proxies, the rightmost X-Forwarded-For entry that
// is not a trusted proxy. See [limiter.ClientIP].
func ClientIP(peerAddr string, header http.Header, trusted []netip.Prefix) netip.Addr {
	return limiter.ClientIP(peerAddr, header, trusted)
}
