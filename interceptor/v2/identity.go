package interceptor

import (
	"context"
	"net/netip"

	"connectrpc.com/connect/v2"

	"github.com/connectlimit/connectlimit/limiter"
)

// Identity is who a call is charged to; see [limiter.Identity].
type Identity = limiter.Identity

// IdentityFunc says who a call is from, given its [connect.CallInfo]
// (request headers, peer address, protocol and procedure). It runs once per
// limited call, before the request is read, and must be safe for
// concurrent use. It may leave [Identity.IP] unset: the interceptor fills
// it from the peer address. A returned *connect.Error is sent to the
// client as is; any other error becomes [connect.CodeInternal].
type IdentityFunc func(ctx context.Context, call *connect.CallInfo) (Identity, error)

// ContextWithIdentity returns a context carrying id, for authentication
// code (a server interceptor before this one, or HTTP middleware in front
// of the server) to tell the interceptor who the caller is.
func ContextWithIdentity(ctx context.Context, id Identity) context.Context {
	return limiter.ContextWithIdentity(ctx, id)
}

// IdentityFromContext returns the identity stored by [ContextWithIdentity],
// and reports false if the context holds none.
//
// Unlike the connect-go v1 adapter, it does not read connectrpc.com/authn's
// info, which would make every connect-go v2 program build connect-go v1:
// with authn's middleware in front of a v2 server, return an Identity from
// its AuthFunc and read it with [WithIdentityFunc] and authn.GetInfo, or
// store it with ContextWithIdentity.
func IdentityFromContext(ctx context.Context) (Identity, bool) {
	return limiter.IdentityFromContext(ctx)
}

func defaultIdentity(ctx context.Context, _ *connect.CallInfo) (Identity, error) {
	id, _ := IdentityFromContext(ctx)
	return id, nil
}

// ClientIP returns the address of the client of a call from peerAddr (a
// peer's "host:port", [connect.CallInfo.PeerAddr]) and its request headers:
// the peer, or, when the peer is one of the trusted proxies, the rightmost
// X-Forwarded-For entry that is not a trusted proxy. See
// [limiter.ClientIP].
func ClientIP(peerAddr string, header *connect.Header, trusted []netip.Prefix) netip.Addr {
	return limiter.ClientIP(peerAddr, header, trusted)
}
