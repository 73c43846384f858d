package main

import (
	"context"
	"crypto/sha256"

	"connectrpc.com/connect/v2"

	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
)

// authenticate returns the server interceptor that tells the rate limiter
// (the next interceptor) who calls: a call with "Authorization: Bearer
// <key>" is the key's owner, in the key's tier; a call without the header
// is anonymous, limited by its client IP; an unknown key or another scheme
// is refused with [connect.CodeUnauthenticated]. With connect-go v2 this is
// an interceptor, which runs before the request is read, rather than HTTP
// middleware.
func authenticate(keys map[[sha256.Size]byte]interceptor.Identity) connect.ServerInterceptor {
	return func(next connect.ServerFunc) connect.ServerFunc {
		return func(ctx context.Context, spec connect.Spec, stream connect.ServerStream) error {
			info, ok := connect.CallInfoForServerContext(ctx)
			if !ok {
				return next(ctx, spec, stream)
			}
			header := info.RequestHeader().Get("Authorization")
			if header == "" {
				return next(ctx, spec, stream)
			}
			token, ok := bearer(header)
			if !ok {
				return connect.NewError(connect.CodeUnauthenticated, `Authorization must be "Bearer <api key>"`)
			}
			id, ok := keys[sha256.Sum256([]byte(token))]
			if !ok {
				return connect.NewError(connect.CodeUnauthenticated, "unknown API key")
			}
			return next(interceptor.ContextWithIdentity(ctx, id), spec, stream)
		}
	}
}
