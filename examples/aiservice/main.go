// Command aiservice is an example AI service rate limited by connectlimit.
// It serves aiservice.v1.AIService (Search, cheap; GenerateReport, an
// expensive server stream from a deterministic fake LLM, priced in its
// tokens) and connectlimit.v1.QuotaService (each caller's buckets) on
// 127.0.0.1:8080, keeping buckets in memory unless -redis is given. The
// limits, tiers and demo API keys are in config.yaml.
//
// With -llm-upstream-rate, the fake LLM has a rate limit of its own and
// refuses calls beyond it, as a provider answers 429; with -llm-rate, the
// service calls it through an outbound limiter (package outbound) that
// waits for its budget and slows down when the model pushes back, so that
// the model's limit does not reach callers.
//
//	go run ./examples/aiservice
//	go run ./examples/aiservice -redis redis://127.0.0.1:6379/0 -config my.yaml
//	go run ./examples/aiservice -llm-upstream-rate 1000 -llm-rate 2000
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
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
	"github.com/connectlimit/connectlimit/examples/aiservice/service"
	"github.com/connectlimit/connectlimit/examples/aiservice/web"
	"github.com/connectlimit/connectlimit/outbound"
	"github.com/connectlimit/connectlimit/server"
)

//go:embed config.yaml
var defaultConfig []byte

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
	llmRate := fs.Float64("llm-rate", 0, "LLM tokens per second the service lets itself use, through an outbound limiter whose bucket holds "+
		"2 seconds of them (shared in Redis with -redis); 0 turns the limiter off")
	upstreamRate := fs.Float64("llm-upstream-rate", 0, "the fake LLM's own limit in tokens per second (its bucket holds 2 seconds of them): "+
		"faster calls are refused, like a provider's 429; 0 means no limit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *llmRate < 0 || *upstreamRate < 0 {
		return fmt.Errorf("-llm-rate and -llm-upstream-rate must not be negative, got %v and %v", *llmRate, *upstreamRate)
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	opts := []server.Option{
		server.WithServices(aiservicev1.File_aiservice_v1_aiservice_proto.Services().ByName("AIService")),
		server.WithLogger(logger),
	}
	store := "in-memory store"
	if *redisURL != "" {
		opts = append(opts, server.WithRedisURL(*redisURL))
		store = "Redis store"
	}
	srv, err := server.New(cfg, opts...)
	if err != nil {
		return err
	}
	defer srv.Close()
	model := llm.New(llm.WithChunkDelay(*chunkDelay), llm.WithRateLimit(*upstreamRate, *upstreamRate*llmBurstSeconds))
	var svcOpts []service.Option
	if *llmRate > 0 {
		limiter, closeLimiter, err := newLLMLimiter(*llmRate, *redisURL, logger)
		if err != nil {
			return err
		}
		defer closeLimiter()
		svcOpts = append(svcOpts, service.WithLimiter(limiter))
		logger.Info("aiservice: calling the LLM through an outbound limiter", "tokens_per_second", *llmRate)
	}
	svc := service.New(model, svcOpts...)
	srv.Handle(aiservicev1connect.NewAIServiceHandler(svc, srv.HandlerOptions()))
	srv.Handle("/", web.Handler()) // the browser demo, at http://ADDR/

	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", *addr)
	if err != nil {
		return err
	}
	logger.Info("aiservice: serving aiservice.v1.AIService", "url", "http://"+ln.Addr().String(), "store", store)
	if ready != nil {
		ready(ln.Addr().String())
	}
	if err := srv.Serve(ctx, ln); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// llmBurstSeconds is how many seconds of its rate the fake LLM's bucket and
// the outbound limiter's hold.
const llmBurstSeconds = 2

// newLLMLimiter returns the outbound limiter of the calls to the LLM,
// keeping its bucket in Redis when redisURL is set (so that every instance
// shares one budget) and in memory otherwise, and a function that releases
// its store.
func newLLMLimiter(rate float64, redisURL string, logger *slog.Logger) (*outbound.Limiter, func(), error) {
	limit, err := bucket.NewLimit(rate*llmBurstSeconds, rate)
	if err != nil {
		return nil, nil, fmt.Errorf("-llm-rate: %w", err)
	}
	var store bucket.Store
	var release func()
	if redisURL == "" {
		mem := memstore.New()
		store, release = mem, func() { _ = mem.Close() }
	} else {
		opts, err := redis.ParseURL(redisURL)
		if err != nil {
			return nil, nil, fmt.Errorf("-redis: %w", err)
		}
		// As redisstore asks: a batch's deadline ends its read, a lost
		// reply is never resent by go-redis, a refused connection is
		// reported at once.
		opts.ContextTimeoutEnabled, opts.MaxRetries, opts.DialerRetries = true, -1, 1
		client := redis.NewClient(opts)
		store, release = redisstore.New(client), func() { _ = client.Close() }
	}
	limiter, err := outbound.New(store, "aiservice-llm", limit, outbound.WithLogger(logger))
	if err != nil {
		release()
		return nil, nil, err
	}
	return limiter, release, nil
}

func loadConfig(path string) (server.Config, error) {
	if path == "" {
		return server.ParseConfig(defaultConfig)
	}
	return server.LoadConfig(path)
}
