// Package memstore is an in-memory [bucket.Store] and [bucket.LeaseStore]:
// the embedded default when connectlimit runs without Redis.
//
// Buckets live in shards selected by a hash of the subject, so concurrent
// calls from different callers rarely contend, and all buckets of one
// request sit in one shard and are decided under one lock. A bucket that has
// refilled to full is deleted, on its next access or by a periodic sweep, so
// idle callers cost no memory. The IDs of idempotent requests and the
// concurrency leases of a subject live in the same shard: an ID is forgotten
// [bucket.DefaultIDWindow] after it was recorded, and an expired lease
// is deleted on the next access to its subject and name or by the sweep.
//
// A Store limits one process. Several processes behind a load balancer each
// enforce the full limit; use Redis to share buckets and leases between
// them.
package memstore

import (
	"context"
	"hash/maphash"
	"sync"
	"time"
	"unsafe"

	"github.com/connectlimit/connectlimit/bucket"
)

// DefaultSweepInterval is how often a Store deletes buckets that have
// refilled to full, unless set with [WithSweepInterval].
const DefaultSweepInterval = time.Minute

// shardCount is a power of two well above the core counts we run on, so two
// busy callers rarely share a lock.
const shardCount = 64

var (
	_ bucket.Store      = (*Store)(nil)
	_ bucket.LeaseStore = (*Store)(nil)
)

// Store is an in-memory [bucket.Store] and [bucket.LeaseStore]. Create one
// with [New] and release it with [Store.Close]. It is safe for concurrent
// use.
type Store struct {
	now    func() time.Time
	sweep  time.Duration
	seed   maphash.Seed
	shards [shardCount]shard
	stop   chan struct{}
	wg     sync.WaitGroup
	closed sync.Once
}

// key names a bucket, a recorded request ID or a lease set within the map
// that holds it: a subject and a bucket name, an ID or a lease name.
type key struct {
	subject, name string
}

type level struct {
	tokens float64
	at     time.Time
	// fullAt is when the bucket will have refilled to capacity, so the
	// sweep can drop it without redoing the refill arithmetic.
	fullAt time.Time
}

// idRecord is one applied request ID, in the order IDs were recorded.
type idRecord struct {
	key     key
	expires time.Time
}

type shardState struct {
	mu      sync.Mutex
	buckets map[key]level
	// ids maps the (subject, ID) of every applied idempotent request to
	// when it expires. idQueue holds the same records oldest first, so
	// that each new record can drop the expired ones without a scan: with
	// a fixed window, expiries are recorded in increasing order (unless
	// the clock steps back, which only delays a drop).
	ids     map[key]time.Time
	idQueue []idRecord
	// leases maps (subject, lease name) to the live leases' IDs and expiry
	// instants. An empty set is deleted.
	leases map[key]map[string]time.Time
}

type shard struct {
	shardState
	// The padding keeps neighbouring shards' locks on different cache
	// lines.
	_ [(cacheLine - unsafe.Sizeof(shardState{})%cacheLine) % cacheLine]byte
}

// cacheLine is the cache line size of the processors we run on, in bytes.
const cacheLine = 64

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
// refilled to full, request IDs older than [bucket.DefaultIDWindow] and
// expired leases. The default is [DefaultSweepInterval]. Zero or a negative
// interval disables the sweep: full buckets and expired leases are then
// deleted only when their subject's buckets or lease name are next touched,
// and expired IDs whenever a request with an ID is applied in their shard.
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
		sh := &s.shards[i]
		sh.buckets = make(map[key]level)
		sh.ids = make(map[key]time.Time)
		sh.leases = make(map[key]map[string]time.Time)
	}
	if s.sweep > 0 {
		s.wg.Add(1)
		go s.sweepLoop()
	}
	return s
}

func (s *Store) shard(subject string) *shard {
	return &s.shards[maphash.String(s.seed, subject)%shardCount]
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
	sh := s.shard(req.Subject)
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
	idKey := key{req.Subject, req.ID}
	if req.ID != "" {
		if expires, ok := sh.ids[idKey]; ok && now.Before(expires) {
			return bucket.DecideDuplicate(req, tokens), nil
		}
	}
	d := bucket.Decide(req, tokens)
	if !d.Allowed {
		return d, nil
	}
	if req.ID != "" {
		sh.recordID(idKey, now)
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

// recordID remembers an applied request's ID until
// [bucket.DefaultIDWindow] from now, and forgets the IDs that have
// expired. The caller holds sh.mu.
func (sh *shard) recordID(k key, now time.Time) {
	sh.pruneIDs(now)
	expires := now.Add(bucket.DefaultIDWindow)
	sh.ids[k] = expires
	sh.idQueue = append(sh.idQueue, idRecord{key: k, expires: expires})
}

// pruneIDs forgets the recorded IDs that have expired by now, oldest first.
// A record whose ID was recorded again later is dropped from the queue
// only. The caller holds sh.mu.
func (sh *shard) pruneIDs(now time.Time) {
	for len(sh.idQueue) > 0 && !now.Before(sh.idQueue[0].expires) {
		r := sh.idQueue[0]
		if exp, ok := sh.ids[r.key]; ok && exp.Equal(r.expires) {
			delete(sh.ids, r.key)
		}
		// Clear the record so that the array no longer holds its strings;
		// append reallocates (keeping only live records) once the slice
		// has moved to the end of its array.
		sh.idQueue[0] = idRecord{}
		sh.idQueue = sh.idQueue[1:]
	}
	if len(sh.idQueue) == 0 {
		sh.idQueue = nil
	}
}

// Acquire implements [bucket.LeaseStore]. It deletes the expired leases of
// req's subject and name, then renews req.ID's lease if it is live, or
// acquires it if fewer than req.Limit leases are. It fails only for a
// malformed request or a done context.
func (s *Store) Acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	if err := ctx.Err(); err != nil {
		return bucket.LeaseDecision{}, err
	}
	if err := req.Validate(); err != nil {
		return bucket.LeaseDecision{}, err
	}
	sh := s.shard(req.Subject)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := s.now()
	k := key{req.Subject, req.Name}
	set := sh.leases[k]
	dropExpired(set, now)
	d := bucket.LeaseDecision{Limit: req.Limit}
	if _, live := set[req.ID]; live || len(set) < req.Limit {
		if set == nil {
			set = make(map[string]time.Time, 1)
			sh.leases[k] = set
		}
		set[req.ID] = now.Add(req.TTL)
		d.Acquired = true
	}
	d.InUse = len(set)
	if len(set) == 0 {
		delete(sh.leases, k)
	}
	return d, nil
}

// Release implements [bucket.LeaseStore]. It fails only for malformed
// arguments or a done context.
func (s *Store) Release(ctx context.Context, subject, name, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := bucket.ValidateLease(subject, name, id); err != nil {
		return err
	}
	sh := s.shard(subject)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	k := key{subject, name}
	if set, ok := sh.leases[k]; ok {
		delete(set, id)
		if len(set) == 0 {
			delete(sh.leases, k)
		}
	}
	return nil
}

// dropExpired deletes the leases of set that have expired by now.
func dropExpired(set map[string]time.Time, now time.Time) {
	for id, expires := range set {
		if !now.Before(expires) {
			delete(set, id)
		}
	}
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

// Sweep deletes every bucket that has refilled to full by now, every
// request ID recorded [bucket.DefaultIDWindow] or longer ago, and every
// expired lease. The background sweep calls it; tests with a fake clock
// call it directly.
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
		sh.pruneIDs(now)
		for k, set := range sh.leases {
			dropExpired(set, now)
			if len(set) == 0 {
				delete(sh.leases, k)
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
