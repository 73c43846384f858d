package client_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/client"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
)

const greetProc = "/greet.v1.GreetService/Greet"

// greetServer serves a Greet procedure limited by connectlimit to a
// "greet" bucket of capacity tokens refilling at perSecond. It returns the
// server's URL and a function that stops it.
func greetServer(capacity, perSecond float64) (string, func()) {
	costs, err := costmap.New(costmap.Config{
		Buckets:    map[string]costmap.BucketConfig{"greet": {Capacity: capacity, RefillPerSecond: perSecond}},
		Procedures: map[string]costmap.ProcedureConfig{greetProc: {Bucket: "greet"}},
	})
	if err != nil {
		panic(err)
	}
	store := memstore.New()
	limiter, err := interceptor.NewInterceptor(store, costs, interceptor.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		panic(err)
	}
	mux := http.NewServeMux()
	mux.Handle(greetProc, connect.NewUnaryHandler(greetProc,
		func(_ context.Context, req *connect.Request[str]) (*connect.Response[str], error) {
			return connect.NewResponse(wrapperspb.String("hello, " + req.Msg.GetValue())), nil
		},
		connect.WithInterceptors(limiter),
	))
	server := httptest.NewServer(mux)
	return server.URL, func() {
		server.Close()
		_ = limiter.Close(context.Background())
		_ = store.Close()
	}
}

func ExampleNewInterceptor() {
	// The server's "greet" bucket holds 2 tokens and refills 2 a second.
	url, stop := greetServer(2, 2)
	defer stop()

	limits, err := client.NewInterceptor() // retries denials with RetryInfo
	if err != nil {
		fmt.Println(err)
		return
	}
	greet := connect.NewClient[str, str](http.DefaultClient, url+greetProc, connect.WithInterceptors(limits))
	for range 3 {
		// The third call is denied with a RetryInfo of about 0.5s, and
		// sent again after it.
		res, err := greet.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("world")))
		if err != nil {
			fmt.Println(err)
			return
		}
		q, _ := limits.Quota("greet")
		fmt.Printf("%s | greet: %d of %d left, refilling in %v\n", res.Msg.GetValue(), q.Remaining, q.Capacity, q.Window)
	}
	// Output:
	// hello, world | greet: 1 of 2 left, refilling in 1s
	// hello, world | greet: 0 of 2 left, refilling in 1s
	// hello, world | greet: 0 of 2 left, refilling in 1s
}

func ExampleDescribe() {
	// The server's "greet" bucket holds 1 token and refills 1 every 100s.
	url, stop := greetServer(1, 0.01)
	defer stop()

	limits, err := client.NewInterceptor()
	if err != nil {
		fmt.Println(err)
		return
	}
	greet := connect.NewClient[str, str](http.DefaultClient, url+greetProc, connect.WithInterceptors(limits))
	for range 2 {
		_, err := greet.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("world")))
		// A wait of 100s is past the default max wait of 10s: the
		// denial comes back at once.
		if limit, ok := client.Describe(err); ok {
			fmt.Printf("%s may call again in %v (bucket %q)\n", limit.Subject, limit.RetryAfter.Round(time.Second), limit.Bucket)
		}
	}
	// Output:
	// ip:127.0.0.1 may call again in 1m40s (bucket "greet")
}

func ExampleWithCost() {
	// The server's "greet" bucket holds 10 tokens and refills 10 a second.
	url, stop := greetServer(10, 10)
	defer stop()

	// Every Greet takes 1 token: hold calls that would be denied, and
	// send them when the bucket has refilled.
	limits, err := client.NewInterceptor(client.WithCost(greetProc, "greet", 1))
	if err != nil {
		fmt.Println(err)
		return
	}
	greet := connect.NewClient[str, str](http.DefaultClient, url+greetProc, connect.WithInterceptors(limits))
	denied := 0
	for range 15 {
		if _, err := greet.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("world"))); err != nil {
			denied++
		}
	}
	fmt.Println("denied:", denied)
	// Output:
	// denied: 0
}

func ExampleInterceptor_Subscribe() {
	url, stop := greetServer(3, 0.001)
	defer stop()

	limits, err := client.NewInterceptor()
	if err != nil {
		fmt.Println(err)
		return
	}
	// A UI would show this; here it is printed.
	unsubscribe := limits.Subscribe(func(q client.Quota) {
		fmt.Printf("%s: %d of %d left (warning: %v)\n", q.Bucket, q.Remaining, q.Capacity, q.Warning)
	})
	defer unsubscribe()
	greet := connect.NewClient[str, str](http.DefaultClient, url+greetProc, connect.WithInterceptors(limits))
	for range 3 {
		if _, err := greet.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("world"))); err != nil {
			fmt.Println(err)
		}
	}
	// Output:
	// greet: 2 of 3 left (warning: false)
	// greet: 1 of 3 left (warning: false)
	// greet: 0 of 3 left (warning: true)
}
