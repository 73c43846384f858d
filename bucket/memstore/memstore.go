// Package memstore is an in-memory [bucket.Store]: the embedded default when
// connectlimit runs without Redis.
//
// Buckets live in shards selected by a hash of the subject, so concurrent
// calls from different callers rarely contend, and all buckets of one
// request sit in one shard and are decided under one lock. A bucket that has
// refilled to full is deleted, on its next access or by a periodic sweep, so
// idle callers cost no memory.
//
// A Store limits one process. Several processes behind a load balancer each
// enforce the full limit; use Redis to share buckets between them.
package memstore

import (
	"context"
	"hash/maphash"
	"sync"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// DefaultSweepInterval is how often a Store deletes buckets that have
// refilled to full, unless set with [WithSweepInterval].
const DefaultSweepInterval = time.Minute

// shardCount is a power of two well above the core counts we run on, so two
// busy callers rarely share a lock.
const shardCount = 64

var _ bucket.Store = (*Store)(nil)

// Store is an in-memory [bucket.Store]. Create one with [New] and release it
// with [Store.Close]. It is safe for concurrent use.
type Store struct {
	now    func() time.Time
	sweep  time.Duration
	seed   maphash.Seed
	shards [shardCount]shard
	stop   chan struct{}
	wg     sync.WaitGroup
	closed sync.Once
}

type key struct {
	subject, bucket string
}

type level struct {
	tokens float64
	at     time.Time
	// fullAt is when the bucket will have refilled to capacity, so the
	// sweep can drop it without redoing the refill arithmetic.
	fullAt time.Time
}

type shard struct {
	mu      sync.Mutex
	buckets map[key]level
	// pad keeps neighbouring shards' locks on different cache lines.
	_ [40]byte
}

// Option configures a [Store].
type Option interface {
	apply(*Store)
}

type optionFunc func(*Store)

func (f optionFunc) apply(s *Store) { f(s) }

// WithClock sets the function the Store reads the present from. The default
// is [time.Now]. Tests pass a fake clock to see refill without sleeping.
func WithClock(now func() time.Time) Option {
	return optionFunc(func(s *Store) { s.now = now })
}

// WithSweepInterval sets how often the Store deletes buckets that have
// refilled to full. The default is [DefaultSweepInterval]. Zero or a
// negative interval disables the sweep: full buckets are then deleted only
// when next touched.
func WithSweepInterval(d time.Duration) Option {
	return optionFunc(func(s *Store) { s.sweep = d })
}

// New returns an empty Store. Unless disabled with [WithSweepInterval], it
// runs one background goroutine that [Store.Close] stops.
func New(opts ...Option) *Store {
	s := &Store{
		now:   time.Now,
		sweep: DefaultSweepInterval,
		seed:  maphash.MakeSeed(),
		stop:  make(chan struct{}),
	}
	for _, o := range opts {
		o.apply(s)
	}
	for i := range s.shards {
		s.shards[i].buckets = make(map[key]level)
	}
	if s.sweep > 0 {
		s.wg.Add(1)
		go s.sweepLoop()
	}
	return s
}

// Take implements [bucket.Store]. It fails only for a malformed request or
// a done context.
func (s *Store) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if err := ctx.Err(); err != nil {
		return bucket.Decision{}, err
	}
	if err := req.Validate(); err != nil {
		return bucket.Decision{}, err
	}
	var stack [4]float64
	tokens := stack[:0]
	sh := &s.shards[maphash.String(s.seed, req.Subject)%shardCount]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := s.now()
	for _, c := range req.Charges {
		t := c.Limit.Capacity
		if lv, ok := sh.buckets[key{req.Subject, c.Bucket}]; ok {
			t = c.Limit.Refill(lv.tokens, now.Sub(lv.at))
		}
		tokens = append(tokens, t)
	}
	d := bucket.Decide(req, tokens)
	if !d.Allowed {
		return d, nil
	}
	for i, c := range req.Charges {
		k, b := key{req.Subject, c.Bucket}, d.Buckets[i]
		if b.Remaining >= c.Limit.Capacity {
			delete(sh.buckets, k)
			continue
		}
		sh.buckets[k] = level{tokens: b.Remaining, at: now, fullAt: now.Add(b.ResetAfter)}
	}
	return d, nil
}

// Len returns how many buckets the Store holds, that is, how many have not
// been seen full since they were last charged. It is meant for tests and
// metrics.
func (s *Store) Len() int {
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		n += len(sh.buckets)
		sh.mu.Unlock()
	}
	return n
}

// Sweep deletes every bucket that has refilled to full by now. The
// background sweep calls it; tests with a fake clock call it directly.
func (s *Store) Sweep() {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		now := s.now()
		for k, lv := range sh.buckets {
			if !now.Before(lv.fullAt) {
				delete(sh.buckets, k)
			}
		}
		sh.mu.Unlock()
	}
}

// Close stops the background sweep. The Store keeps working afterwards; it
// just no longer sweeps. Close is idempotent and always returns nil.
func (s *Store) Close() error {
	s.closed.Do(func() { close(s.stop) })
	s.wg.Wait()
	return nil
}

func (s *Store) sweepLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.sweep)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.Sweep()
		}
	}
}
