package interceptor_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
)

func ExampleNewInterceptor() {
	const procedure = "/greet.v1.GreetService/Greet"
	// Buckets come from the configuration file; which procedure draws from
	// which bucket usually comes from the connectlimit.v1.limit annotation
	// in the .proto, here from the configuration instead.
	costs, err := costmap.New(costmap.Config{
		Buckets: map[string]costmap.BucketConfig{
			"greet": {Capacity: 2, RefillPerSecond: 0.1},
		},
		Procedures: map[string]costmap.ProcedureConfig{
			procedure: {Bucket: "greet"},
		},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	store := memstore.New() // or redisstore.New(redisClient)
	defer store.Close()
	limiter, err := interceptor.NewInterceptor(store, costs)
	if err != nil {
		fmt.Println(err)
		return
	}

	mux := http.NewServeMux()
	mux.Handle(procedure, connect.NewUnaryHandler(procedure,
		func(_ context.Context, req *connect.Request[wrapperspb.StringValue]) (*connect.Response[wrapperspb.StringValue], error) {
			return connect.NewResponse(wrapperspb.String("hello, " + req.Msg.GetValue())), nil
		},
		limiter.HandlerOptions(), // the interceptor, and a gate that decides before decoding
	))
	server := httptest.NewServer(mux)
	defer server.Close()

	client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](server.Client(), server.URL+procedure)
	for range 3 {
		res, err := client.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("world")))
		var denied *connect.Error
		if errors.As(err, &denied) {
			fmt.Println(denied.Code(), "| Retry-After:", denied.Meta().Get("Retry-After"))
			continue
		}
		fmt.Println(res.Msg.GetValue(), "| RateLimit:", res.Header().Get("RateLimit"))
	}
	// Output:
	// hello, world | RateLimit: "greet";r=1;t=10
	// hello, world | RateLimit: "greet";r=0;t=20
	// resource_exhausted | Retry-After: 10
}
