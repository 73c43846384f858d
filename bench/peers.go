package main

import (
	"context"
	_ "embed"
	"fmt"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"golang.org/x/time/rate"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/denycache"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
)

// Peer names, as -only accepts them and the table prints them.
const (
	peerRedisStore = "connectlimit"
	peerDenyCache  = "connectlimit+denycache"
	peerRedisRate  = "redis_rate"
	peerTextbook   = "textbook"
	peerMemStore   = "memstore"
	peerXRate      = "xrate"
)

// peer is one rate limiter under test. Each call takes one token from each
// of a subject's buckets, whose names and limit (capacity and refill) are
// fixed when the peer is made ([peerConfig]). Peers are safe for concurrent
// use.
type peer interface {
	// name returns the peer's name in the table.
	name() string
	// decide charges one token to each of subject's buckets and reports
	// whether the call is allowed. connectlimit's stores charge all of
	// them or none in one call; the others have no multi-bucket call, so
	// decide charges them one after the other and stops at the first
	// denial. err reports a failure of the backend only.
	// caller is the number of the calling goroutine, from 0 to
	// peerConfig.callers - 1, so that a peer may keep scratch space per
	// caller; no two goroutines call with the same number at once.
	decide(ctx context.Context, caller int, subject string) (allowed bool, err error)
	// close releases what the peer opened (not the Redis server).
	close() error
}

// peerConfig is what every peer of a section shares.
type peerConfig struct {
	// limit is the shape of every bucket.
	limit limitSpec
	// buckets names each subject's buckets, at least one.
	buckets []string
	// addr is the Redis server's address, for the Redis peers.
	addr string
	// pool is the go-redis pool size of each Redis peer's client.
	pool int
	// maxBuckets bounds memstore's buckets when > 0; otherwise memstore
	// keeps its default bound.
	maxBuckets int
	// callers is how many goroutines call decide at once at most; 0
	// means 1.
	callers int
}

// redisPeer is a peer whose buckets live in Redis.
type redisPeer interface {
	peer
	// sent returns how many commands the peer's client has sent to Redis,
	// counting each command of a pipeline and each EVALSHA → EVAL
	// fallback.
	sent() uint64
}

// limitSpec is the shape of every bucket of a peer: Capacity tokens when
// full, refilled at RefillPerSecond tokens a second.
type limitSpec struct {
	Capacity        float64
	RefillPerSecond float64
}

// bound returns the most calls of cost 1 a bucket that starts full can allow
// in elapsed: its capacity plus its refill.
func (l limitSpec) bound(elapsed time.Duration) float64 {
	return l.Capacity + l.RefillPerSecond*elapsed.Seconds()
}

// clientOptions are the go-redis options every Redis peer's client gets: the
// pool size of the brief, and what redisstore's documentation asks of a
// client (a deadline that ends the socket read, no resends, one dial
// attempt). They change nothing for the other peers in a healthy run, and
// giving every peer the same client keeps the comparison fair.
func clientOptions(addr string, pool int) *redis.Options {
	return &redis.Options{
		Addr:                  addr,
		PoolSize:              pool,
		ContextTimeoutEnabled: true,
		MaxRetries:            -1,
		DialerRetries:         1,
	}
}

// countingClient returns a client of addr and a counter of the commands it
// sends, kept by a go-redis hook.
func countingClient(addr string, pool int) (*redis.Client, *atomic.Uint64) {
	c := redis.NewClient(clientOptions(addr, pool))
	n := new(atomic.Uint64)
	c.AddHook(commandCounter{n: n})
	return c, n
}

// commandCounter is a go-redis hook that counts the commands a client sends.
type commandCounter struct {
	n *atomic.Uint64
}

// DialHook implements redis.Hook; it counts nothing.
func (h commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

// ProcessHook implements redis.Hook: one command.
func (h commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmd)
	}
}

// ProcessPipelineHook implements redis.Hook: every command of the pipeline.
func (h commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.n.Add(uint64(len(cmds)))
		return next(ctx, cmds)
	}
}

// newPeer makes the peer called name.
func newPeer(name string, cfg peerConfig) (peer, error) {
	switch name {
	case peerRedisStore:
		return newRedisStorePeer(cfg, false)
	case peerDenyCache:
		return newRedisStorePeer(cfg, true)
	case peerRedisRate:
		return newRedisRatePeer(cfg)
	case peerTextbook:
		return newTextbookPeer(cfg), nil
	case peerMemStore:
		return newMemStorePeer(cfg)
	case peerXRate:
		return newXRatePeer(cfg), nil
	default:
		return nil, fmt.Errorf("unknown peer %q", name)
	}
}

// redisStorePeer is connectlimit's Redis store, [redisstore.Store], alone
// or behind its local denial cache, [denycache.Store]. Like memStorePeer,
// each decision writes its bucket states into its caller's own buffer.
type redisStorePeer struct {
	label   string
	client  *redis.Client
	count   *atomic.Uint64
	store   bucket.Store
	charges []bucket.Charge
	into    intoBuffers
}

// newRedisStorePeer makes a redisstore.Store with its defaults on a new
// client of cfg.addr, wrapped in a denycache.Store with its defaults when
// denyCache is set.
func newRedisStorePeer(cfg peerConfig, denyCache bool) (*redisStorePeer, error) {
	charges, err := chargesOf(cfg)
	if err != nil {
		return nil, err
	}
	c, n := countingClient(cfg.addr, cfg.pool)
	p := &redisStorePeer{label: peerRedisStore, client: c, count: n, store: redisstore.New(c), charges: charges, into: newIntoBuffers(cfg.callers, len(charges))}
	if denyCache {
		p.label, p.store = peerDenyCache, denycache.New(p.store)
	}
	return p, nil
}

// name implements peer.
func (p *redisStorePeer) name() string { return p.label }

// sent implements redisPeer.
func (p *redisStorePeer) sent() uint64 { return p.count.Load() }

// close implements peer.
func (p *redisStorePeer) close() error { return p.client.Close() }

// decide implements peer.
func (p *redisStorePeer) decide(ctx context.Context, caller int, subject string) (bool, error) {
	d, err := p.store.Take(ctx, bucket.Request{Subject: subject, Charges: p.charges, Into: p.into.of(caller)})
	return d.Allowed, err
}

// chargesOf returns one charge of cost 1 for each bucket of cfg, shared by
// every request (stores do not modify them).
func chargesOf(cfg peerConfig) ([]bucket.Charge, error) {
	l, err := bucket.NewLimit(cfg.limit.Capacity, cfg.limit.RefillPerSecond)
	if err != nil {
		return nil, err
	}
	charges := make([]bucket.Charge, len(cfg.buckets))
	for i, b := range cfg.buckets {
		charges[i] = bucket.Charge{Bucket: b, Limit: l, Cost: 1}
	}
	return charges, nil
}

// redisRatePeer is github.com/go-redis/redis_rate/v10: GCRA in a Lua script
// on the server's clock, one key per bucket ("rate:" + subject + ":" +
// bucket).
type redisRatePeer struct {
	client   *redis.Client
	count    *atomic.Uint64
	limiter  *redis_rate.Limiter
	limit    redis_rate.Limit
	suffixes []string
}

// newRedisRatePeer makes a redis_rate.Limiter on a new client of cfg.addr,
// with the limit expressed as Burst = capacity and Rate per Period = the
// refill.
func newRedisRatePeer(cfg peerConfig) (*redisRatePeer, error) {
	l, err := redisRateLimit(cfg.limit)
	if err != nil {
		return nil, err
	}
	c, n := countingClient(cfg.addr, cfg.pool)
	return &redisRatePeer{client: c, count: n, limiter: redis_rate.NewLimiter(c), limit: l, suffixes: suffixes(":", cfg.buckets)}, nil
}

// suffixes returns sep + name for each name.
func suffixes(sep string, names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = sep + n
	}
	return out
}

// redisRateLimit converts limit to redis_rate's integer Rate per Period:
// Rate tokens a second when the refill is a whole number, else one token
// per 1/refill seconds.
func redisRateLimit(limit limitSpec) (redis_rate.Limit, error) {
	if limit.Capacity < 1 || limit.Capacity != math.Trunc(limit.Capacity) || limit.RefillPerSecond <= 0 {
		return redis_rate.Limit{}, fmt.Errorf("redis_rate needs a whole capacity and a positive refill, got %+v", limit)
	}
	l := redis_rate.Limit{Burst: int(limit.Capacity), Rate: 1, Period: time.Duration(float64(time.Second) / limit.RefillPerSecond)}
	if r := limit.RefillPerSecond; r >= 1 && r == math.Trunc(r) {
		l.Rate, l.Period = int(r), time.Second
	}
	return l, nil
}

// name implements peer.
func (p *redisRatePeer) name() string { return peerRedisRate }

// sent implements redisPeer.
func (p *redisRatePeer) sent() uint64 { return p.count.Load() }

// close implements peer.
func (p *redisRatePeer) close() error { return p.client.Close() }

// decide implements peer.
func (p *redisRatePeer) decide(ctx context.Context, _ int, subject string) (bool, error) {
	for _, suffix := range p.suffixes {
		res, err := p.limiter.Allow(ctx, subject+suffix, p.limit)
		if err != nil {
			return false, err
		}
		if res.Allowed == 0 {
			return false, nil
		}
	}
	return true, nil
}

//go:embed textbook.lua
var textbookLua string

// textbookPeer is the textbook Lua token bucket (textbook.lua): a hash of
// tokens and timestamp per bucket ("tb:{" + subject + "}:" + bucket),
// refilled from the application's clock.
type textbookPeer struct {
	client   *redis.Client
	count    *atomic.Uint64
	script   *redis.Script
	suffixes []string
	// capacity and refill are the script's constant arguments.
	capacity, refill string
	// now is the application clock passed to the script.
	now func() time.Time
}

// newTextbookPeer makes the textbook script's peer on a new client of
// cfg.addr.
func newTextbookPeer(cfg peerConfig) *textbookPeer {
	c, n := countingClient(cfg.addr, cfg.pool)
	return &textbookPeer{
		client:   c,
		count:    n,
		script:   redis.NewScript(textbookLua),
		suffixes: suffixes("}:", cfg.buckets),
		capacity: strconv.FormatFloat(cfg.limit.Capacity, 'g', -1, 64),
		refill:   strconv.FormatFloat(cfg.limit.RefillPerSecond, 'g', -1, 64),
		now:      time.Now,
	}
}

// name implements peer.
func (p *textbookPeer) name() string { return peerTextbook }

// sent implements redisPeer.
func (p *textbookPeer) sent() uint64 { return p.count.Load() }

// close implements peer.
func (p *textbookPeer) close() error { return p.client.Close() }

// decide implements peer.
func (p *textbookPeer) decide(ctx context.Context, _ int, subject string) (bool, error) {
	for _, suffix := range p.suffixes {
		now := strconv.FormatFloat(float64(p.now().UnixMicro())/1e6, 'f', 6, 64)
		v, err := p.script.Run(ctx, p.client, []string{"tb:{" + subject + suffix}, p.capacity, p.refill, now, "1").Int()
		if err != nil {
			return false, err
		}
		if v != 1 {
			return false, nil
		}
	}
	return true, nil
}

// memStorePeer is connectlimit's in-memory store, [memstore.Store]. Each
// decision writes its bucket states into its caller's own buffer
// (bucket.Request.Into), as a caller that reuses one does, so that it
// allocates nothing.
type memStorePeer struct {
	store   *memstore.Store
	charges []bucket.Charge
	into    intoBuffers
}

// intoBuffers are the [bucket.Request.Into] buffers of a peer's callers,
// one per caller, as a caller that reuses one has.
type intoBuffers struct {
	// all[c*stride:][:n] is caller c's buffer; stride keeps the buffers
	// of two callers off a common cache line.
	all       []bucket.BucketState
	n, stride int
}

// newIntoBuffers makes buffers of n states for callers callers (at least
// one).
func newIntoBuffers(callers, n int) intoBuffers {
	// Room for one more state than a decision needs keeps a cache line
	// (64 bytes, less than a state) between two callers' buffers.
	stride := n + 1
	return intoBuffers{all: make([]bucket.BucketState, max(callers, 1)*stride), n: n, stride: stride}
}

// of returns caller's buffer.
func (b intoBuffers) of(caller int) []bucket.BucketState { return b.all[caller*b.stride:][:b.n] }

// newMemStorePeer makes a memstore.Store with its defaults (its sweep
// included), bounded to cfg.maxBuckets buckets when that is > 0.
func newMemStorePeer(cfg peerConfig) (*memStorePeer, error) {
	charges, err := chargesOf(cfg)
	if err != nil {
		return nil, err
	}
	var opts []memstore.Option
	if cfg.maxBuckets > 0 {
		opts = append(opts, memstore.WithMaxBuckets(cfg.maxBuckets))
	}
	return &memStorePeer{store: memstore.New(opts...), charges: charges, into: newIntoBuffers(cfg.callers, len(charges))}, nil
}

// name implements peer.
func (p *memStorePeer) name() string { return peerMemStore }

// close implements peer.
func (p *memStorePeer) close() error { return p.store.Close() }

// decide implements peer.
func (p *memStorePeer) decide(ctx context.Context, caller int, subject string) (bool, error) {
	d, err := p.store.Take(ctx, bucket.Request{Subject: subject, Charges: p.charges, Into: p.into.of(caller)})
	return d.Allowed, err
}

// xratePeer is the common in-memory limiter built on golang.org/x/time/rate:
// a map from key to *rate.Limiter behind one sync.Mutex, each limiter made
// on its key's first call and never forgotten. With one bucket the key is
// the subject; with more, subject + ":" + bucket.
type xratePeer struct {
	limit    limitSpec
	suffixes []string
	mu       sync.Mutex
	m        map[string]*rate.Limiter
}

// newXRatePeer makes an empty map of limiters.
func newXRatePeer(cfg peerConfig) *xratePeer {
	p := &xratePeer{limit: cfg.limit, m: make(map[string]*rate.Limiter)}
	if len(cfg.buckets) > 1 {
		p.suffixes = suffixes(":", cfg.buckets)
	}
	return p
}

// name implements peer.
func (p *xratePeer) name() string { return peerXRate }

// close implements peer.
func (p *xratePeer) close() error { return nil }

// decide implements peer.
func (p *xratePeer) decide(_ context.Context, _ int, subject string) (bool, error) {
	if p.suffixes == nil {
		return p.allow(subject), nil
	}
	for _, suffix := range p.suffixes {
		if !p.allow(subject + suffix) {
			return false, nil
		}
	}
	return true, nil
}

// allow takes one token from key's limiter, making it if needed.
func (p *xratePeer) allow(key string) bool {
	p.mu.Lock()
	l := p.m[key]
	if l == nil {
		l = rate.NewLimiter(rate.Limit(p.limit.RefillPerSecond), int(p.limit.Capacity))
		p.m[key] = l
	}
	p.mu.Unlock()
	return l.Allow()
}
