// Command aiservice is an example AI service rate limited by connectlimit.
// It serves aiservice.v1.AIService (Search, cheap; GenerateReport, an
// expensive server stream from a deterministic fake LLM, priced in its
// tokens) and connectlimit.v1.QuotaService (each caller's buckets) on
// 127.0.0.1:8080, keeping buckets in memory unless -redis is given. The
// limits, tiers and demo API keys are in config.yaml.
//
//	go run ./examples/aiservice
//	go run ./examples/aiservice -redis redis://127.0.0.1:6379/0 -config my.yaml
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

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
	"github.com/connectlimit/connectlimit/examples/aiservice/service"
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
	svc := service.New(llm.New(llm.WithChunkDelay(*chunkDelay)))
	srv.Handle(aiservicev1connect.NewAIServiceHandler(svc, srv.HandlerOptions()))

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

func loadConfig(path string) (server.Config, error) {
	if path == "" {
		return server.ParseConfig(defaultConfig)
	}
	return server.LoadConfig(path)
}
