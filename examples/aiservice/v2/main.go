// Command aiservice is the example AI service on connect-go v2
// (connectrpc.com/connect/v2), rate limited by connectlimit's connect-go v2
// interceptor (the module interceptor/v2). It serves the same
// aiservice.v1.AIService as the connect-go v1 example one directory up,
// answered by the same deterministic fake LLM and limited by the same
// config.yaml, with the same API keys and tiers, plus
// connectlimit.v1.QuotaService and the browser demo, on 127.0.0.1:8080,
// keeping buckets in memory unless -redis is given.
//
// It is a module of its own, so that connect-go v2 never enters the root
// module:
//
//	go run -C examples/aiservice/v2 .
//	go run -C examples/aiservice/v2 . -redis redis://127.0.0.1:6379/0 -config my.yaml
//
// Unlike the v1 example, which the server package assembles, it limits
// neither failed authentications nor cross-origin calls, and has no
// outbound limiter in front of the model.
package main

import (
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
	"github.com/connectlimit/connectlimit/examples/aiservice/v2/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/examples/aiservice/web"
	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// defaultConfig is a copy of ../config.yaml (go:embed cannot reach a
// parent directory); a test keeps the two identical.
//
//go:embed config.yaml
var defaultConfig []byte

// shutdownTimeout is how long calls in flight may finish once the server
// is told to stop.
const shutdownTimeout = 10 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr, nil); err != nil {
		stop()
		if errors.Is(err, flag.ErrHelp) {
			return // -h printed the usage
		}
		fmt.Fprintln(os.Stderr, "aiservice:", err)
		os.Exit(1)
	}
}

// run parses args, serves until ctx is done and reports where it listens
// to ready (when not nil) once it accepts calls.
func run(ctx context.Context, args []string, stderr io.Writer, ready func(addr string)) error {
	fs := flag.NewFlagSet("aiservice", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "address to listen on")
	redisURL := fs.String("redis", "", "Redis URL, e.g. redis://127.0.0.1:6379/0; empty keeps buckets in memory")
	configPath := fs.String("config", "", "YAML configuration file; empty uses the built-in examples/aiservice/config.yaml")
	chunkDelay := fs.Duration("chunk-delay", 20*time.Millisecond, "pause between streamed report chunks, to look like a real model")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	// The quota service is limited like the others, so the configuration
	// may name it.
	costs, err := costmap.New(cfg.Config,
		aiservicev1.File_aiservice_v1_aiservice_proto.Services().ByName("AIService"),
		connectlimitv1.File_connectlimit_v1_quota_proto.Services().Get(0))
	if err != nil {
		return err
	}
	store, closeStore, err := openStore(ctx, *redisURL, cfg, logger)
	if err != nil {
		return err
	}
	defer closeStore()
	local := memstore.New() // decides calls while Redis is down (failure_policy: local)
	defer local.Close()
	limit, limits, err := interceptor.NewServerInterceptor(store, costs,
		append(cfg.limiterOptions(), interceptor.WithLocalStore(local), interceptor.WithLogger(logger))...)
	if err != nil {
		return err
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
		defer cancel()
		if err := limits.Close(closeCtx); err != nil {
			logger.Warn("aiservice: settlements left unapplied", "error", err)
		}
	}()

	// Every service on this server runs behind authentication, then the
	// rate limiter.
	server := connect.NewServer(authenticate(cfg.apiKeys()), limit)
	aiservicev1connect.RegisterAIServiceHandler(server, service{model: llm.New(llm.WithChunkDelay(*chunkDelay))})
	interceptor.RegisterQuotaService(server, limits)
	mux := http.NewServeMux()
	maxBytes := cfg.MaxMessageBytes
	if maxBytes == 0 {
		maxBytes = 4 << 20
	}
	connecthttp.Mount(mux, server, connecthttp.WithReadMaxBytes(maxBytes))
	mux.Handle("/", web.Handler()) // the browser demo, at http://ADDR/

	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", *addr)
	if err != nil {
		return err
	}
	storeName := "in-memory store"
	if *redisURL != "" {
		storeName = "Redis store"
	}
	logger.Info("aiservice: serving aiservice.v1.AIService with connect-go v2", "url", "http://"+ln.Addr().String(), "store", storeName)
	if ready != nil {
		ready(ln.Addr().String())
	}
	return serve(ctx, ln, mux, cfg)
}

// openStore returns the store of the buckets: Redis at url, or memory when
// url is empty; and a function that releases it.
func openStore(ctx context.Context, url string, cfg config, logger *slog.Logger) (bucket.Store, func(), error) {
	if url == "" {
		mem := memstore.New()
		return mem, func() { _ = mem.Close() }, nil
	}
	opts, err := redis.ParseURL(url)
	if err != nil {
		return nil, nil, fmt.Errorf("-redis: %w", err)
	}
	// As redisstore asks: a batch's deadline ends its read, a lost reply
	// is never resent by go-redis, a refused connection is reported at
	// once; two warm connections serve the store's two batches in flight.
	opts.ContextTimeoutEnabled, opts.MaxRetries, opts.DialerRetries = true, -1, 1
	opts.MinIdleConns = max(opts.MinIdleConns, 2)
	redis.SetLogger(redisstore.NewLogger(logger))
	client := redis.NewClient(opts)
	pingCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := client.Ping(pingCtx).Err(); err != nil {
		_ = client.Close()
		return nil, nil, fmt.Errorf("-redis: Redis does not answer: %w", err)
	}
	return redisstore.New(client, redisstore.WithTimeout(cfg.storeTimeout())), func() { _ = client.Close() }, nil
}

// serve serves h on ln over HTTP/1.1 and cleartext HTTP/2 (h2c, for gRPC
// clients) until ctx is done, then shuts down: it stops accepting, lets
// calls finish for [shutdownTimeout], cancels the rest and waits for their
// handlers to return, so that every call settles before the limiter is
// closed.
func serve(ctx context.Context, ln net.Listener, h http.Handler, cfg config) error {
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	calls, cancelCalls := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelCalls()
	var active sync.WaitGroup
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			active.Add(1)
			defer active.Done()
			h.ServeHTTP(w, r)
		}),
		Protocols:         protocols,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       durationOr(cfg.ReadTimeout, time.Minute),
		IdleTimeout:       durationOr(cfg.IdleTimeout, 2*time.Minute),
		BaseContext:       func(net.Listener) context.Context { return calls },
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		cancelCalls()
		_ = srv.Close()
	}
	active.Wait()
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
