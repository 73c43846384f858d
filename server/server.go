// Package server assembles connectlimit into a running Connect server:
// configuration → store (in memory, or Redis) → cost map → interceptor →
// API-key authentication → an HTTP server speaking HTTP/1.1 and h2c, so
// Connect, gRPC and gRPC-Web clients (streams included) all work, with
// graceful shutdown.
//
// Register handlers with the interceptor from [Server.Interceptor]:
//
//	srv, err := server.New(cfg, server.WithServices(aiservicev1.File_aiservice_v1_aiservice_proto.Services()))
//	srv.Handle(aiservicev1connect.NewAIServiceHandler(svc, connect.WithInterceptors(srv.Interceptor())))
//	err = srv.ListenAndServe(ctx, "127.0.0.1:8080")
package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"connectrpc.com/authn"
	"connectrpc.com/connect"
	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
)

// DefaultShutdownTimeout is how long [Server.Serve] waits for calls in
// flight once its context is done, unless set with [WithShutdownTimeout].
const DefaultShutdownTimeout = 10 * time.Second

// Server is a Connect server with connectlimit installed. It serves
// connectlimit.v1.QuotaService (see [interceptor.Interceptor.NewQuotaHandler])
// next to the handlers mounted with [Server.Handle]. Build it with
// [New], mount handlers with [Server.Handle], run it with [Server.Serve] or
// [Server.ListenAndServe], and release its store with [Server.Close].
type Server struct {
	cfg         Config
	opts        options
	store       bucket.Store
	closers     []func() error
	costs       *costmap.Map
	interceptor *interceptor.Interceptor
	mux         *http.ServeMux
	handler     http.Handler
	keys        map[keyDigest]interceptor.Identity
}

// Option configures a [Server].
type Option interface {
	apply(*options)
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

type options struct {
	redisURL        string
	redisClient     redis.UniversalClient
	services        []protoreflect.ServiceDescriptor
	logger          *slog.Logger
	shutdownTimeout time.Duration
	interceptorOpts []interceptor.Option
}

// WithRedisURL keeps buckets in the Redis server at url
// ("redis://[:password@]host:port[/db]", or "rediss://" for TLS). New
// fails if the server does not answer a PING. Without a Redis option the
// buckets live in memory, limiting this process only.
func WithRedisURL(url string) Option {
	return optionFunc(func(o *options) { o.redisURL = url })
}

// WithRedis keeps buckets in Redis through client, which may be a
// single-node, Sentinel (failover) or Cluster client. The caller keeps
// ownership: [Server.Close] does not close it. Configure the client with
// ContextTimeoutEnabled, so the store timeout holds against a hung server,
// and MaxRetries -1, so a lost reply is not resent and charged twice; the
// client WithRedisURL builds has both.
func WithRedis(client redis.UniversalClient) Option {
	return optionFunc(func(o *options) { o.redisClient = client })
}

// WithServices names the services that will be mounted, so that their
// annotations are checked against the configuration by New instead of on
// their first call.
func WithServices(services ...protoreflect.ServiceDescriptor) Option {
	return optionFunc(func(o *options) { o.services = append(o.services, services...) })
}

// WithLogger sets the logger; the default is [slog.Default].
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(o *options) { o.logger = l })
}

// WithShutdownTimeout sets how long Serve waits for calls in flight once
// its context is done; the default is [DefaultShutdownTimeout].
func WithShutdownTimeout(d time.Duration) Option {
	return optionFunc(func(o *options) { o.shutdownTimeout = d })
}

// WithInterceptorOptions passes further options to the interceptor, after
// those derived from the configuration.
func WithInterceptorOptions(opts ...interceptor.Option) Option {
	return optionFunc(func(o *options) { o.interceptorOpts = append(o.interceptorOpts, opts...) })
}

// New validates cfg and builds the store, cost map and interceptor.
func New(cfg Config, opts ...Option) (*Server, error) {
	o := options{logger: slog.Default(), shutdownTimeout: DefaultShutdownTimeout}
	for _, opt := range opts {
		opt.apply(&o)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if o.redisURL != "" && o.redisClient != nil {
		return nil, errors.New("server: WithRedisURL and WithRedis are exclusive")
	}
	s := &Server{cfg: cfg, opts: o, mux: http.NewServeMux()}
	if err := s.build(); err != nil {
		_ = s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Server) build() error {
	var err error
	s.costs, err = costmap.New(s.cfg.Config, s.opts.services...)
	if err != nil {
		return err
	}
	if err := s.openStore(); err != nil {
		return err
	}
	policy, _ := s.cfg.failurePolicy()   // Validate checked it.
	proxies, _ := s.cfg.trustedProxies() // Validate checked them.
	icOpts := []interceptor.Option{
		interceptor.WithFailurePolicy(policy),
		interceptor.WithTrustedProxies(proxies...),
		interceptor.WithLogger(s.opts.logger),
	}
	if s.cfg.StoreTimeout > 0 {
		icOpts = append(icOpts, interceptor.WithStoreTimeout(s.cfg.StoreTimeout))
	}
	s.interceptor, err = interceptor.NewInterceptor(s.store, s.costs, append(icOpts, s.opts.interceptorOpts...)...)
	if err != nil {
		return err
	}
	s.keys = s.cfg.apiKeys()
	s.handler = authn.NewMiddleware(s.authenticate).Wrap(s.mux)
	s.closers = append(s.closers, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.shutdownTimeout)
		defer cancel()
		return s.interceptor.Close(ctx)
	})
	// Through the interceptor too, so procedures: or default_bucket: in
	// the configuration can limit it like any other procedure.
	s.mux.Handle(s.interceptor.NewQuotaHandler(connect.WithInterceptors(s.interceptor)))
	return nil
}

func (s *Server) openStore() error {
	client := s.opts.redisClient
	if s.opts.redisURL != "" {
		ropts, err := redis.ParseURL(s.opts.redisURL)
		if err != nil {
			return fmt.Errorf("server: redis URL %q: %w", redact(s.opts.redisURL), err)
		}
		// Deadlines from the interceptor's store timeout must cut a call to
		// a hung server short, and a lost reply must not be resent: the
		// resent script would charge the call a second time.
		ropts.ContextTimeoutEnabled = true
		ropts.MaxRetries = -1
		c := redis.NewClient(ropts)
		s.closers = append(s.closers, c.Close)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if err := c.Ping(ctx).Err(); err != nil {
			return fmt.Errorf("server: redis at %s does not answer: %w", redact(s.opts.redisURL), err)
		}
		client = c
	}
	if client != nil {
		s.store = redisstore.New(client)
		return nil
	}
	ms := memstore.New()
	s.closers = append(s.closers, ms.Close)
	s.store = ms
	return nil
}

// redact hides the password of a Redis URL.
func redact(url string) string {
	scheme, rest, ok := strings.Cut(url, "://")
	if !ok {
		return url
	}
	userinfo, host, ok := strings.Cut(rest, "@")
	if !ok {
		return url
	}
	if user, _, hasPassword := strings.Cut(userinfo, ":"); hasPassword {
		return scheme + "://" + user + ":xxxxx@" + host
	}
	return url
}

// authenticate turns "Authorization: Bearer <key>" into an identity. No
// header means an anonymous caller; a header that is not a known key is an
// error, so a typo in a key never silently becomes anonymous access.
func (s *Server) authenticate(_ context.Context, r authn.Request) (any, error) {
	h := r.Header().Get("Authorization")
	if h == "" {
		return nil, nil //nolint:nilnil // anonymous
	}
	token, ok := strings.CutPrefix(h, "Bearer ")
	if !ok {
		return nil, authn.Errorf("Authorization must be \"Bearer <api key>\"")
	}
	id, ok := s.keys[sha256.Sum256([]byte(strings.TrimSpace(token)))]
	if !ok {
		return nil, authn.Errorf("unknown API key")
	}
	return id, nil
}

// Interceptor returns the rate-limiting interceptor to pass to
// [connect.WithInterceptors] when creating handlers.
func (s *Server) Interceptor() *interceptor.Interceptor { return s.interceptor }

// Store returns the store the interceptor charges, for inspection.
func (s *Server) Store() bucket.Store { return s.store }

// Handle mounts a handler, typically the pair a generated
// New...ServiceHandler returns.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// Handler returns every mounted handler behind API-key authentication,
// for use with a server of the caller's own.
func (s *Server) Handler() http.Handler { return s.handler }

// Serve serves on ln until ctx is done, then shuts down gracefully: it
// stops accepting, waits up to the shutdown timeout for calls in flight, and
// returns nil. It speaks HTTP/1.1 and cleartext HTTP/2 (h2c).
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	hs := &http.Server{
		Handler:           s.handler,
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.opts.logger.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.opts.shutdownTimeout)
	defer cancel()
	if err := hs.Shutdown(shutdownCtx); err != nil {
		_ = hs.Close()
		return fmt.Errorf("server: shutdown: %w", err)
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// ListenAndServe listens on addr and calls [Server.Serve].
func (s *Server) ListenAndServe(ctx context.Context, addr string) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Close releases what New opened: it flushes the settlements waiting for
// the store (for at most the shutdown timeout), then stops the in-memory
// store's sweeper or closes the Redis client made from WithRedisURL.
func (s *Server) Close() error {
	var errs []error
	for _, c := range slices.Backward(s.closers) {
		errs = append(errs, c())
	}
	s.closers = nil
	return errors.Join(errs...)
}
