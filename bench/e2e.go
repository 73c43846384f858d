package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/examples/aiservice/service"
	"github.com/connectlimit/connectlimit/server"
)

// e2eConfig is the example's configuration with limits far above what a
// run can spend, so that every call is allowed and the comparison with
// and without the interceptor measures its overhead, not its denials.
// Bucket and limit names are those the example's proto annotations use.
const e2eConfig = `
buckets:
  search:            { capacity: 1e12, refill_per_second: 1e9 }
  generate_requests: { capacity: 1e12, refill_per_second: 1e9 }
  generate_tokens:   { capacity: 1e12, refill_per_second: 1e9 }
  all_ai_tokens:     { capacity: 1e12, refill_per_second: 1e9 }
concurrency:
  generate_streams: { limit: 1000, lease: 30s }
`

// e2eServer is the example service (package service of
// examples/aiservice) assembled with [server.New] and its in-memory store,
// serving on a loopback port.
type e2eServer struct {
	addr   string
	srv    *server.Server
	cancel context.CancelFunc
	done   chan error
}

// startE2E builds the example's server with one API key per caller
// ("bench-key-N", owner "bench-N"), mounts AIService with the interceptor
// (withInterceptor) or without it (every other part of the assembly,
// authentication included, stays), and serves it on a free loopback port.
func startE2E(ctx context.Context, callers int, withInterceptor bool) (*e2eServer, error) {
	cfg, err := server.ParseConfig([]byte(e2eConfig))
	if err != nil {
		return nil, fmt.Errorf("the end-to-end configuration: %w", err)
	}
	cfg.APIKeys = make(map[string]server.APIKey, callers)
	for i := range callers {
		cfg.APIKeys[apiKey(i)] = server.APIKey{User: fmt.Sprintf("bench-%d", i), Name: fmt.Sprintf("bench-%d", i)}
	}
	srv, err := server.New(cfg,
		server.WithServices(aiservicev1.File_aiservice_v1_aiservice_proto.Services().ByName("AIService")),
		server.WithLogger(slog.New(slog.DiscardHandler)),
		server.WithShutdownTimeout(5*time.Second),
	)
	if err != nil {
		return nil, err
	}
	svc := service.New(nil)
	if withInterceptor {
		srv.Handle(aiservicev1connect.NewAIServiceHandler(svc, srv.HandlerOptions()))
	} else {
		srv.Handle(aiservicev1connect.NewAIServiceHandler(svc, connect.WithReadMaxBytes(server.DefaultMaxMessageBytes)))
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		_ = srv.Close()
		return nil, err
	}
	serveCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s := &e2eServer{addr: ln.Addr().String(), srv: srv, cancel: cancel, done: make(chan error, 1)}
	go func() { s.done <- srv.Serve(serveCtx, ln) }()
	return s, nil
}

// apiKey returns the API key of caller i.
func apiKey(i int) string { return fmt.Sprintf("bench-key-%d", i) }

// stop shuts the server down and releases its store.
func (s *e2eServer) stop() error {
	s.cancel()
	err := <-s.done
	return errors.Join(err, s.srv.Close())
}

// e2eClient is a Connect client of the example's AIService over HTTP/1.1
// (one connection per caller) or h2c (shared connections).
type e2eClient struct {
	client    aiservicev1connect.AIServiceClient
	transport *http.Transport
}

// newE2EClient returns a client of addr speaking protocol, "h1" or "h2c".
func newE2EClient(addr, protocol string, callers int) (*e2eClient, error) {
	t := &http.Transport{
		MaxIdleConns:        callers,
		MaxIdleConnsPerHost: callers,
		IdleConnTimeout:     time.Minute,
	}
	var p http.Protocols
	switch protocol {
	case "h1":
		p.SetHTTP1(true)
	case "h2c":
		p.SetUnencryptedHTTP2(true)
	default:
		return nil, fmt.Errorf("-e2e-protocol must be h1 or h2c, got %q", protocol)
	}
	t.Protocols = &p
	return &e2eClient{
		client:    aiservicev1connect.NewAIServiceClient(&http.Client{Transport: t, Timeout: 10 * time.Second}, "http://"+addr),
		transport: t,
	}, nil
}

// search makes one Search call as caller's API key. A denial (which the
// configuration's limits should make impossible) is reported as allowed
// false; any other failure as an error.
func (c *e2eClient) search(ctx context.Context, caller int) (bool, error) {
	req := connect.NewRequest(&aiservicev1.SearchRequest{Query: "token bucket rate limit", TopK: 3})
	req.Header().Set("Authorization", "Bearer "+apiKey(caller))
	_, err := c.client.Search(ctx, req)
	if connect.CodeOf(err) == connect.CodeResourceExhausted {
		return false, nil
	}
	return err == nil, err
}

// e2eSlices is how many slices each cell of the end-to-end pair is cut
// into: the two cells take turns slice by slice, so that the machine's
// noise, when it changes more slowly than a slice, hits both alike.
const e2eSlices = 4

// e2ePair measures Search calls per second through the example server
// with the interceptor and without it, at callers concurrent callers, each
// with its own API key (so its own buckets). Both servers run at once; the
// two cells get d each, in e2eSlices slices, taking turns in the order
// with, without, without, with… (first is the index, 0 or 1, of the one
// that goes first), each after a warm-up of warm.
func e2ePair(ctx context.Context, callers int, d, warm time.Duration, protocol string, first int) (with, without *cellResult, err error) {
	settle()
	var ops [2]opFunc // with, without
	for i, on := range []bool{true, false} {
		s, err := startE2E(ctx, callers, on)
		if err != nil {
			return nil, nil, err
		}
		defer func() { _ = s.stop() }()
		c, err := newE2EClient(s.addr, protocol, callers)
		if err != nil {
			return nil, nil, err
		}
		defer c.transport.CloseIdleConnections()
		if ok, err := c.search(ctx, 0); err != nil || !ok {
			return nil, nil, fmt.Errorf("the first Search call failed (allowed %v): %w", ok, err)
		}
		ops[i] = func(ctx context.Context, caller, _ int) (bool, error) { return c.search(ctx, caller) }
	}
	for _, op := range ops {
		drive(ctx, callers, warm, op)
	}
	var res [2]cellResult
	for k := range e2eSlices {
		for _, i := range inTurn([]int{first, 1 - first}, k) {
			res[i].add(drive(ctx, callers, d/e2eSlices, ops[i]))
		}
	}
	return &res[0], &res[1], ctx.Err()
}
