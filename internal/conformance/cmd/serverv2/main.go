// Command serverv2 is a server under test for the Connect conformance suite
// built on connect-go v2 (connectrpc.com/connect/v2): it serves
// connectrpc.conformance.v1.ConformanceService over the Connect, gRPC and
// gRPC-Web protocols. connectconformance starts it (--mode server -- serverv2
// [-connectlimit]) and talks to it over stdin and stdout (see package sut).
//
// With -connectlimit, every procedure runs behind connectlimit's connect-go
// v2 server interceptor (module
// github.com/connectlimit/connectlimit/interceptor/v2), which
// [connectlimitInterceptor] builds. -check builds the server and exits
// without serving.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
	"github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1/conformancev1connectv2"
	"github.com/connectlimit/connectlimit/internal/conformance/sut"
)

func main() {
	limited := flag.Bool("connectlimit", false, "limit every procedure with connectlimit's connect-go v2 interceptor (in-memory store)")
	check := flag.Bool("check", false, "build the server (with connectlimit if asked) and exit without serving")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	err := run(ctx, *limited, *check)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "serverv2:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, limited, check bool) error {
	var interceptors []connect.ServerInterceptor
	if limited {
		costs, err := sut.Costs()
		if err != nil {
			return err
		}
		store := memstore.New()
		defer store.Close()
		limiter, closeLimiter, err := connectlimitInterceptor(store, costs)
		if err != nil {
			return err
		}
		defer func() {
			closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_ = closeLimiter(closeCtx)
		}()
		interceptors = append(interceptors, limiter)
	}
	server := connect.NewServer(interceptors...)
	conformancev1connectv2.RegisterConformanceServiceHandler(server, service{})
	if check {
		return nil
	}
	return sut.Run(ctx, os.Stdin, os.Stdout, func(req *conformancev1.ServerCompatRequest) (http.Handler, error) {
		var opts []connecthttp.Option
		if limit := req.GetMessageReceiveLimit(); limit > 0 {
			opts = append(opts, connecthttp.WithReadMaxBytes(int(limit)))
		}
		mux := http.NewServeMux()
		connecthttp.Mount(mux, server, opts...)
		return mux, nil
	})
}
