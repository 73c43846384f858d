// Command serverv1 is a server under test for the Connect conformance suite
// built on connect-go v1 (connectrpc.com/connect): it serves
// connectrpc.conformance.v1.ConformanceService over the Connect, gRPC and
// gRPC-Web protocols. connectconformance starts it (--mode server -- serverv1
// [-connectlimit]) and talks to it over stdin and stdout (see package sut).
//
// With -connectlimit, every handler runs behind connectlimit's interceptor
// (interceptor.NewInterceptor over a memstore, with the costs of
// sut.Costs), so that the suite checks that limiting a service leaves its
// protocol behaviour intact. -check builds the handler (and the interceptor)
// and exits without serving.
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

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/interceptor"
	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
	"github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1/conformancev1connect"
	"github.com/connectlimit/connectlimit/internal/conformance/sut"
)

func main() {
	limited := flag.Bool("connectlimit", false, "limit every procedure with connectlimit's interceptor (in-memory store)")
	check := flag.Bool("check", false, "build the handler (with connectlimit if asked) and exit without serving")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	err := run(ctx, *limited, *check)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "serverv1:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, limited, check bool) error {
	var opts []connect.HandlerOption
	if limited {
		costs, err := sut.Costs()
		if err != nil {
			return err
		}
		store := memstore.New()
		defer store.Close()
		limiter, err := interceptor.NewInterceptor(store, costs)
		if err != nil {
			return err
		}
		defer func() {
			closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_ = limiter.Close(closeCtx)
		}()
		opts = append(opts, connect.WithInterceptors(limiter))
	}
	newHandler := func(req *conformancev1.ServerCompatRequest) (http.Handler, error) {
		opts := opts
		if limit := req.GetMessageReceiveLimit(); limit > 0 {
			opts = append(opts[:len(opts):len(opts)], connect.WithReadMaxBytes(int(limit)))
		}
		mux := http.NewServeMux()
		mux.Handle(conformancev1connect.NewConformanceServiceHandler(service{}, opts...))
		return mux, nil
	}
	if check {
		_, err := newHandler(&conformancev1.ServerCompatRequest{})
		return err
	}
	return sut.Run(ctx, os.Stdin, os.Stdout, newHandler)
}
