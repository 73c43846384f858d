package main

import (
	"context"

	"connectrpc.com/connect/v2"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
	interceptorv2 "github.com/connectlimit/connectlimit/interceptor/v2"
)

// connectlimitInterceptor returns the connect-go v2 server interceptor that
// serverv2 -connectlimit installs on every procedure, limiting calls by
// costs with buckets in store, and a function that flushes and stops it when
// the server stops.
func connectlimitInterceptor(store bucket.Store, costs *costmap.Map) (connect.ServerInterceptor, func(context.Context) error, error) {
	ic, lim, err := interceptorv2.NewServerInterceptor(store, costs)
	if err != nil {
		return nil, nil, err
	}
	return ic, lim.Close, nil
}
