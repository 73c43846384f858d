// Package server assembles connectlimit into a running Connect server:
// configuration → store (in memory, or Redis behind a circuit breaker, with
// an in-memory fallback) → cost map → interceptor → API-key authentication
// (with failed attempts limited per client IP) → an HTTP server speaking
// HTTP/1.1 and h2c, so Connect, gRPC and gRPC-Web clients (streams
// included) all work, with request size limits, read and idle timeouts,
// and graceful shutdown.
//
// Register handlers with the options from [Server.HandlerOptions], which
// install the interceptor and the message size limit:
//
//	srv, err := server.New(cfg, server.WithServices(aiservicev1.File_aiservice_v1_aiservice_proto.Services()))
//	srv.Handle(aiservicev1connect.NewAIServiceHandler(svc, srv.HandlerOptions()))
//	err = srv.ListenAndServe(ctx, "127.0.0.1:8080")
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/authn"
	"connectrpc.com/connect"
	connectcors "connectrpc.com/cors"
	"github.com/redis/go-redis/v9"
	"github.com/rs/cors"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
	"github.com/connectlimit/connectlimit/limiter"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// DefaultShutdownTimeout is how long [Server.Serve] lets calls in flight
// finish once its context is done, before it cancels them, unless set with
// [WithShutdownTimeout].
const DefaultShutdownTimeout = 10 * time.Second

// cancelGrace is how long Serve waits, after cancelling the calls still in
// flight at the end of the shutdown timeout, for their handlers to return
// and settle.
const cancelGrace = 5 * time.Second

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
	proxies     []netip.Prefix
	authLimit   bucket.Limit // zero when failed authentications are not limited
	blocked     *blockList
	active      activeCalls
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
// MaxRetries -1, so that go-redis never resends a request on its own, and
// DialerRetries 1, so that a refused connection is known not to have
// applied anything; the client WithRedisURL builds has all three.
func WithRedis(client redis.UniversalClient) Option {
	return optionFunc(func(o *options) { o.redisClient = client })
}

// WithServices names the services that will be mounted, so that their
// annotations are checked against the configuration by New instead of on
// their first call, and so that every procedure the configuration names
// must be one of theirs (or be marked external).
func WithServices(services ...protoreflect.ServiceDescriptor) Option {
	return optionFunc(func(o *options) { o.services = append(o.services, services...) })
}

// WithLogger sets the logger; the default is [slog.Default]. When New
// connects to Redis itself (WithRedisURL), go-redis's own log lines go to
// it too.
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(o *options) { o.logger = l })
}

// WithShutdownTimeout sets how long Serve lets calls in flight finish once
// its context is done, before it cancels them; the default is
// [DefaultShutdownTimeout].
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
	if o.shutdownTimeout <= 0 {
		return nil, fmt.Errorf("server: shutdown timeout must be greater than 0, got %v", o.shutdownTimeout)
	}
	s := &Server{cfg: cfg, opts: o, mux: http.NewServeMux(), blocked: newBlockList(maxBlocked)}
	if err := s.build(); err != nil {
		_ = s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Server) build() error {
	var err error
	// The quota service is mounted here, so the configuration may name it.
	services := s.opts.services
	if len(services) > 0 {
		services = append(slices.Clip(services), connectlimitv1.File_connectlimit_v1_quota_proto.Services().Get(0))
	}
	s.costs, err = costmap.New(s.cfg.Config, services...)
	if err != nil {
		return err
	}
	if err := s.openStore(); err != nil {
		return err
	}
	policy, _ := s.cfg.failurePolicy()    // Validate checked it.
	s.proxies, _ = s.cfg.trustedProxies() // Validate checked them.
	s.authLimit, _ = s.cfg.authFailureLimit()
	local := memstore.New()
	s.closers = append(s.closers, local.Close)
	icOpts := []interceptor.Option{
		interceptor.WithFailurePolicy(policy),
		interceptor.WithLocalStore(local),
		interceptor.WithTrustedProxies(s.proxies...),
		interceptor.WithLogger(s.opts.logger),
		interceptor.WithStoreTimeout(s.cfg.storeTimeout()),
		interceptor.WithDenialCache(s.cfg.DenialCache == nil || *s.cfg.DenialCache),
	}
	if s.cfg.LocalShare != 0 {
		icOpts = append(icOpts, interceptor.WithLocalShare(s.cfg.LocalShare))
	}
	s.interceptor, err = interceptor.NewInterceptor(s.store, s.costs, append(icOpts, s.opts.interceptorOpts...)...)
	if err != nil {
		return err
	}
	s.keys = s.cfg.apiKeys()
	s.handler = s.active.track(s.cors(s.limitUnaryBodies(authn.NewMiddleware(s.authenticate).Wrap(s.mux))))
	s.closers = append(s.closers, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), s.opts.shutdownTimeout)
		defer cancel()
		return s.interceptor.Close(ctx)
	})
	// Through the interceptor too, so procedures: or default_bucket: in
	// the configuration can limit it like any other procedure.
	s.mux.Handle(s.interceptor.NewQuotaHandler(s.HandlerOptions()))
	return nil
}

func (s *Server) openStore() error {
	client := s.opts.redisClient
	if s.opts.redisURL != "" {
		ropts, err := redis.ParseURL(s.opts.redisURL)
		if err != nil {
			return fmt.Errorf("server: redis URL %q: %w", redact(s.opts.redisURL), err)
		}
		// Deadlines must cut a call to a hung server short, and go-redis
		// must not resend on its own: the interceptor resends with the
		// request's ID when it must. Two warm connections serve the store's
		// two batches in flight without dialling under a cold burst.
		ropts.ContextTimeoutEnabled = true
		ropts.MaxRetries = -1
		// One dial attempt: a refused connection then says at once that
		// nothing was sent, instead of retrying until the deadline.
		ropts.DialerRetries = 1
		ropts.MinIdleConns = max(ropts.MinIdleConns, 2)
		redis.SetLogger(redisstore.NewLogger(s.opts.logger))
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
		s.store = redisstore.New(client, redisstore.WithTimeout(s.cfg.storeTimeout()), redisstore.WithGroups(s.cfg.RedisGroups))
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

// HandlerOptions returns the options to build every handler the server
// serves with: the rate-limiting interceptor and the largest request
// message it reads (max_message_bytes, 4 MiB by default).
func (s *Server) HandlerOptions() connect.HandlerOption {
	return connect.WithHandlerOptions(
		s.interceptor.HandlerOptions(),
		connect.WithReadMaxBytes(s.cfg.maxMessageBytes()),
	)
}

// Interceptor returns the rate-limiting interceptor, for handlers built
// without [Server.HandlerOptions].
func (s *Server) Interceptor() *interceptor.Interceptor { return s.interceptor }

// Limiter returns the accounting behind the interceptor, so that handlers
// built with connect-go v2 can share it: pass it to the interceptor/v2
// module's constructor and mount them with [Server.Handle].
func (s *Server) Limiter() *limiter.Limiter { return s.interceptor.Limiter() }

// Store returns the store the interceptor charges, for inspection.
func (s *Server) Store() bucket.Store { return s.store }

// Handle mounts a handler, typically the pair a generated
// New...ServiceHandler returns.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// Handler returns every mounted handler behind API-key authentication,
// for use with a server of the caller's own.
func (s *Server) Handler() http.Handler { return s.handler }

// Serve serves on ln until ctx is done, then shuts down gracefully: it
// stops accepting, lets calls in flight finish for up to the shutdown
// timeout, then cancels those left and waits for their handlers to return
// (so that every call settles before [Server.Close] flushes the settle queue
// and closes the store), and returns nil. It speaks HTTP/1.1 and cleartext
// HTTP/2 (h2c), with the configuration's read and idle timeouts and a 10s
// bound on reading request headers.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	hs := &http.Server{
		Handler:           s.handler,
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       durationOr(s.cfg.ReadTimeout, DefaultReadTimeout),
		IdleTimeout:       durationOr(s.cfg.IdleTimeout, DefaultIdleTimeout),
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
		// Closing the connections cancels the calls still running; their
		// handlers then return and settle.
		_ = hs.Close()
		if !s.active.wait(cancelGrace) {
			s.opts.logger.Error("server: handlers still running after shutdown; their calls may not settle", "grace", cancelGrace)
		}
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
// the store (for at most the shutdown timeout) and stops the interceptor's
// circuit breaker, then stops the in-memory stores' sweepers and closes the
// Redis client made from WithRedisURL. Call it after Serve has returned.
func (s *Server) Close() error {
	var errs []error
	for _, c := range slices.Backward(s.closers) {
		errs = append(errs, c())
	}
	s.closers = nil
	return errors.Join(errs...)
}

// cors answers CORS preflights and marks responses for the configured
// origins, before authentication (a preflight carries no credentials). It
// returns h itself when no origin is allowed.
func (s *Server) cors(h http.Handler) http.Handler {
	origins := s.cfg.CORS.AllowedOrigins
	if len(origins) == 0 {
		return h
	}
	maxAge := s.cfg.CORS.MaxAge
	if maxAge == 0 {
		maxAge = DefaultCORSMaxAge
	}
	return cors.New(cors.Options{
		AllowedOrigins: origins,
		AllowedMethods: connectcors.AllowedMethods(),
		AllowedHeaders: append(connectcors.AllowedHeaders(), "Authorization"),
		ExposedHeaders: append(connectcors.ExposedHeaders(), interceptor.HeaderNames()...),
		MaxAge:         int(maxAge / time.Second),
	}).Handler(h)
}

// limitUnaryBodies refuses, before reading a byte of it, a Connect unary
// request whose Content-Length says its message is over the size limit.
// Connect's own limit (WithReadMaxBytes, in HandlerOptions) bounds the
// memory a message takes but reads the rest of an oversized body to report
// its size; this spares the server the reading too. Streaming requests
// (Connect streaming, gRPC, gRPC-Web) carry several messages in one body,
// so their bodies are left to Connect's per-message limit.
func (s *Server) limitUnaryBodies(h http.Handler) http.Handler {
	max := int64(s.cfg.maxMessageBytes())
	errw := connect.NewErrorWriter()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ct := r.Header.Get("Content-Type")
		if r.ContentLength > max && r.Method == http.MethodPost &&
			(strings.HasPrefix(ct, "application/proto") || strings.HasPrefix(ct, "application/json")) {
			_ = errw.Write(w, r, connect.NewError(connect.CodeResourceExhausted,
				fmt.Errorf("message size %d is larger than configured max %d", r.ContentLength, max)))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// activeCalls counts the requests being served, so that shutdown can wait
// for handlers that are still settling.
type activeCalls struct {
	mu   sync.Mutex
	n    int
	zero chan struct{} // closed when n drops to zero; nil while n is zero
}

func (a *activeCalls) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.n++
		a.mu.Unlock()
		defer func() {
			a.mu.Lock()
			a.n--
			if a.n == 0 && a.zero != nil {
				close(a.zero)
				a.zero = nil
			}
			a.mu.Unlock()
		}()
		h.ServeHTTP(w, r)
	})
}

// wait waits up to d for every request to end, and reports whether they
// did.
func (a *activeCalls) wait(d time.Duration) bool {
	a.mu.Lock()
	if a.n == 0 {
		a.mu.Unlock()
		return true
	}
	if a.zero == nil {
		a.zero = make(chan struct{})
	}
	zero := a.zero
	a.mu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-zero:
		return true
	case <-t.C:
		return false
	}
}
