// Package memstore is an in-memory [bucket.Store] and [bucket.LeaseStore]:
// the embedded default when connectlimit runs without Redis.
//
// Buckets live in shards selected by a hash of the subject, so concurrent
// calls from different callers rarely contend, and all buckets of one
// request sit in one shard and are decided under one lock. A bucket that has
// refilled to full is deleted, on its next access or by a periodic sweep, so
// idle callers cost no memory. The concurrency leases of a subject live in
// the same shard; an expired lease is deleted on the next access to its
// subject and name or by the sweep.
//
// # Cost of a decision
//
// A Take reads the clock before it takes its shard's lock (with the default
// clock, only the monotonic clock, which costs half of [time.Now]), and
// builds its decision after releasing it, so that the lock of a subject
// every caller shares is held only for the lookup, the refill and the
// update. A Take allocates nothing on an existing bucket when the caller
// passes [bucket.Request.Into]; without it, it allocates the decision's
// buckets, once, before taking the lock.
//
// A caller that keeps asking its buckets for what they cannot pay (an
// abusive client, a retry loop) is denied without the lock: once a shard
// has denied the same take twice in a row (the same buckets, at most
// four), it keeps a snapshot of those buckets, which calls read with a
// sequence lock, and a take of exactly those buckets that their levels in
// the snapshot (refilled to the present, under the call's own limits)
// cannot pay is denied from it, with the decision the locked path would
// make. A call they can pay, and any other, takes the lock; every write to
// one of the buckets, and its eviction or deletion, drops the snapshot
// first. So a flood of denied calls on one hot key scales with the cores
// instead of queueing on its shard's lock, and leaves that lock to the
// shard's other subjects. A call decided from the snapshot is
// decided at the later of its clock reading and the snapshot's, so it may
// be decided at an instant earlier than a call that read the clock after
// it and holds the lock meanwhile: both are concurrent, and the denial
// writes nothing.
//
// # Bounded memory
//
// A Store holds at most [WithMaxBuckets] buckets ([DefaultMaxBuckets]
// unless set), split evenly across its shards, so that a flood of new
// subjects (a scan, spoofed addresses, random API keys) cannot grow it
// without end. When a charge would add a bucket to a shard that is at its
// bound, the Store evicts the bucket of that shard that will be full
// soonest, the new one included (which is then not added). Evicting a bucket is forgetting it, which is treating it as full,
// so an eviction is the only way a Store over-admits: it lets the evicted
// bucket's subject take at most capacity − level tokens more than it
// should, and the evicted bucket is always the one in its shard nearest to
// full, so a flood of new subjects evicts the buckets that matter least.
// A subject that has just spent heavily is the last to be forgotten.
// [Store.Evictions] counts evictions: one that keeps rising means the bound
// is too small for the traffic.
//
// # Request IDs
//
// A Store implements [bucket.InProcess]: its state lives in this process, so
// it never loses a reply and nothing it applied is ever resent. It therefore
// does not remember [bucket.Request.ID]s: a request is applied each time it
// is sent, and its decision never reports Duplicate.
//
// A Store limits one process. Several processes behind a load balancer each
// enforce the full limit; use Redis to share buckets and leases between
// them.
package memstore

import (
	"context"
	"fmt"
	"hash/maphash"
	"math"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/connectlimit/connectlimit/bucket"
)

// DefaultSweepInterval is how often a Store deletes buckets that have
// refilled to full, unless set with [WithSweepInterval].
const DefaultSweepInterval = time.Minute

// DefaultMaxBuckets is how many buckets a Store holds at most unless set
// with [WithMaxBuckets]: 1<<20, about a million. Measured on amd64 with Go
// 1.26, a bucket costs 95 to 105 bytes of heap (its 64-byte record, its
// 8-byte place in the index, its 12-byte place in the eviction heap, and
// the arrays' spare room) besides the strings of its subject and bucket
// name, which it shares with the request that created it:
// BenchmarkMemoryPerBucket measures 105 bytes at 100k buckets and 95 at 1M
// (an x/time/rate Limiter in a map, measured the same way, costs 115 and
// 136). A Store full at the default bound holds about 95 MiB plus the
// distinct subject strings. Buckets live only until they have refilled, so
// a Store reaches its bound only under a flood of subjects.
const DefaultMaxBuckets = 1 << 20

// shardCount is a power of two well above the core counts we run on, so two
// busy callers rarely share a lock.
const shardCount = 64

var (
	_ bucket.Store      = (*Store)(nil)
	_ bucket.LeaseStore = (*Store)(nil)
	_ bucket.InProcess  = (*Store)(nil)
)

// Store is an in-memory [bucket.Store] and [bucket.LeaseStore]. Create one
// with [New] and release it with [Store.Close]. It is safe for concurrent
// use.
type Store struct {
	// now is the clock set with WithClock; nil means time.Now, which
	// instant reads more cheaply.
	now func() time.Time
	// epoch is the instant the Store was made. Instants are kept as
	// nanoseconds since epoch, which is smaller than a time.Time and, with
	// a real clock, still measured on the monotonic clock.
	epoch    time.Time
	sweep    time.Duration
	perShard int
	seed     maphash.Seed
	shards   [shardCount]shard
	stop     chan struct{}
	wg       sync.WaitGroup
	closed   sync.Once
}

// key names a bucket or a lease set: a subject and a bucket or lease name.
type key struct {
	subject, name string
}

// equal reports whether k and o are the same key.
func (k key) equal(o key) bool {
	return sameString(k.subject, o.subject) && sameString(k.name, o.name)
}

// sameString reports whether a == b, without comparing the bytes when both
// share them: a bucket keeps the strings of the request that created it,
// and callers often send the same strings again (bucket names from their
// configuration), which == would compare byte by byte.
func sameString(a, b string) bool {
	return len(a) == len(b) && (unsafe.StringData(a) == unsafe.StringData(b) || a == b)
}

// entry is one bucket: its level at an instant, and when it will be full.
// It is 64 bytes on 64-bit platforms.
type entry struct {
	key    key
	tokens float64
	// at and fullAt are nanoseconds since the Store's epoch. fullAt is
	// when the bucket will have refilled to capacity, so that the eviction
	// heap can order buckets and the sweep drop them without redoing the
	// refill arithmetic (which needs the bucket's limit, which the Store
	// does not keep).
	at, fullAt int64
	// pos is the entry's index in its shard's heap.
	pos int32
	// hash is the key's hash (see [Store.bucketHash]), kept so that the
	// index can be rebuilt and searched without hashing again.
	hash uint32
}

// indexSlot is one slot of a shard's index: the hash of a bucket's key and
// its slot in entries plus one, so that the zero indexSlot is empty.
type indexSlot struct {
	hash uint32
	slot int32
}

type shardState struct {
	// mu, last, entries and index, which every Take reads, come first, so
	// that they share a cache line.
	mu sync.Mutex
	// last is the latest instant the shard has decided at (see
	// [shard.advance]).
	last int64
	// entries holds the shard's buckets densely, in no order. index is an
	// open-addressing hash table (linear probing, at most 3/4 full, its
	// length a power of two) from each bucket's key to its slot in
	// entries; it stores no key, so a bucket's strings are held once. A Go
	// map keyed by subject and name measured about 50 bytes more per
	// bucket.
	//
	// heap holds every slot once, as a binary min-heap ordered by keys,
	// so that the bucket nearest to full is at its root: keys[i] is the key
	// of heap[i], a lower bound of that bucket's fullAt. Charging a bucket
	// only moves its fullAt later, so it leaves the key alone and costs no
	// heap work; only a refund, which moves fullAt earlier, lowers the key
	// at once. Whoever needs the exact root (an eviction, the sweep) first
	// raises a stale root key to its bucket's fullAt and sifts it down (see
	// [shard.root]). The keys sit in their own array so that sifting reads
	// them in order rather than through the entries.
	entries []entry
	index   []indexSlot
	heap    []int32
	keys    []int64
	// peak is the most buckets the shard has held since its storage was
	// last rebuilt; the sweep rebuilds a shard that has shrunk well below
	// it.
	peak      int
	evictions uint64
	// denied tells the request the shard last denied (see
	// [shard.noteDenial]). A request denied twice in a row gets the
	// snapshot (see [shard.snap]): taking one costs a dozen atomic writes
	// or more, which a request denied once, among many, would not repay.
	denied uint32
	// leases maps (subject, lease name) to the live leases' IDs and expiry
	// instants. An empty set is deleted.
	leases map[key]map[string]int64
}

type shard struct {
	shardState
	// The padding keeps the snapshot, which denied calls read without the
	// lock, off the cache lines that every locked call writes.
	_ [(cacheLine - unsafe.Sizeof(shardState{})%cacheLine) % cacheLine]byte
	// snap holds the buckets of the request the shard last denied, for
	// the calls after it (see [snapshot]). It fills whole cache lines
	// (TestShardSize checks that a shard does), so neighbouring shards
	// stay apart.
	snap snapshot
}

// snapshot is a copy of the buckets of one request of a shard, their keys
// and state, that calls read without the shard's lock: the buckets of the
// request the shard last denied (see [Store.Take]). A caller hammering
// buckets it cannot pay is then denied from the snapshot, as the locked
// path would deny it, without taking the lock that every other subject of
// the shard needs; the first call that can pay (after a refill, a refund)
// goes through the lock, and every write to one of the buckets, or its
// removal, invalidates the snapshot first.
//
// It is a sequence lock: a writer, who holds the shard's lock, makes seq
// odd, writes the fields and makes seq even again; a reader reads seq, the
// fields and seq again, and uses what it read only if seq was the same
// even number both times and the snapshot was valid. Every field is
// atomic, so that readers never race with the writer.
type snapshot struct {
	seq   atomic.Uint64
	valid atomic.Bool
	// n is how many buckets it holds, the first n of buckets, in the
	// order of the request's charges.
	n atomic.Int32
	// The buckets' subject: the bytes and length of the string their
	// entries hold, which the pointer keeps alive.
	subject    atomic.Pointer[byte]
	subjectLen atomic.Int64
	buckets    [snapMax]snapBucket
}

// snapMax is how many buckets a snapshot holds at most: a request of more
// charges is always decided under the lock.
const snapMax = fewCharges

// snapBucket is one bucket of a snapshot: its entry's hash, name, tokens
// and at.
type snapBucket struct {
	hash    atomic.Uint32
	name    atomic.Pointer[byte]
	nameLen atomic.Int64
	tokens  atomic.Uint64 // a float64's bits
	at      atomic.Int64
}

// set makes the snapshot a copy of the entries in slots, at most snapMax,
// which are one subject's. The caller holds the shard's lock.
func (sn *snapshot) set(entries []entry, slots []int32) {
	sn.seq.Add(1)
	sn.valid.Store(true)
	sn.n.Store(int32(len(slots)))
	subject := entries[slots[0]].key.subject
	sn.subject.Store(unsafe.StringData(subject))
	sn.subjectLen.Store(int64(len(subject)))
	for i, slot := range slots {
		e, b := &entries[slot], &sn.buckets[i]
		b.hash.Store(e.hash)
		b.name.Store(unsafe.StringData(e.key.name))
		b.nameLen.Store(int64(len(e.key.name)))
		b.tokens.Store(math.Float64bits(e.tokens))
		b.at.Store(e.at)
	}
	sn.seq.Add(1)
}

// forget invalidates the snapshot if it holds the bucket k, whose hash is
// h, before that bucket is written or removed. The caller holds the shard's
// lock, so no other writer changes the fields meanwhile.
func (sn *snapshot) forget(h uint32, k key) {
	if !sn.valid.Load() || !sameBytes(sn.subject.Load(), sn.subjectLen.Load(), k.subject) {
		return
	}
	for i := range int(sn.n.Load()) {
		b := &sn.buckets[i]
		if b.hash.Load() == h && sameBytes(b.name.Load(), b.nameLen.Load(), k.name) {
			sn.seq.Add(1)
			sn.valid.Store(false)
			// Let go of the buckets' strings, which their entries may no
			// longer hold.
			sn.subject.Store(nil)
			for j := range sn.buckets {
				sn.buckets[j].name.Store(nil)
			}
			sn.seq.Add(1)
			return
		}
	}
}

// read copies into tokens and at the state of the buckets of subject's
// charges, whose hashes are hashes, if the snapshot is a valid, consistent
// copy of exactly those, in that order. It takes no lock. It compares the
// keys only once it knows that the pointers and lengths it read belong
// together (seq did not move), so that it never reads beyond a string.
func (sn *snapshot) read(subject string, charges []bucket.Charge, hashes *[snapMax]uint32, tokens *[snapMax]float64, at *[snapMax]int64) bool {
	n := len(charges)
	seq := sn.seq.Load()
	// A snapshot of other buckets, the common case, is told by the first
	// fields alone (a torn read of them only misses the snapshot; one
	// that matches is checked against seq below).
	if seq&1 != 0 || !sn.valid.Load() || int(sn.n.Load()) != n || sn.buckets[0].hash.Load() != hashes[0] {
		return false
	}
	subj, subjLen := sn.subject.Load(), sn.subjectLen.Load()
	var names [snapMax]*byte
	var nameLens [snapMax]int64
	var hs [snapMax]uint32
	for i := range n {
		b := &sn.buckets[i]
		hs[i], names[i], nameLens[i] = b.hash.Load(), b.name.Load(), b.nameLen.Load()
		tokens[i], at[i] = math.Float64frombits(b.tokens.Load()), b.at.Load()
	}
	if sn.seq.Load() != seq || !sameBytes(subj, subjLen, subject) {
		return false
	}
	for i := range n {
		if hs[i] != hashes[i] || !sameBytes(names[i], nameLens[i], charges[i].Bucket) {
			return false
		}
	}
	return true
}

// readOne is read for a request of the one bucket k, whose hash is h (the
// common case, spared read's arrays): it returns the bucket's tokens and
// instant.
func (sn *snapshot) readOne(h uint32, k key) (tokens float64, at int64, ok bool) {
	seq, b := sn.seq.Load(), &sn.buckets[0]
	if seq&1 != 0 || !sn.valid.Load() || sn.n.Load() != 1 || b.hash.Load() != h {
		return 0, 0, false
	}
	subject, subjectLen := sn.subject.Load(), sn.subjectLen.Load()
	name, nameLen := b.name.Load(), b.nameLen.Load()
	tokens, at = math.Float64frombits(b.tokens.Load()), b.at.Load()
	if sn.seq.Load() != seq || !sameBytes(subject, subjectLen, k.subject) || !sameBytes(name, nameLen, k.name) {
		return 0, 0, false
	}
	return tokens, at, true
}

// sameBytes reports whether the n bytes at p are s.
func sameBytes(p *byte, n int64, s string) bool {
	return n == int64(len(s)) && (p == unsafe.StringData(s) || unsafe.String(p, n) == s)
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
// (and what a nil function means) is [time.Now]. Tests pass a fake clock to
// see refill without sleeping. The function must be safe for concurrent
// use. The Store reads it before it locks the buckets it decides, and never
// moves a bucket back in time: a call that read an instant earlier than one
// its buckets were already decided at is decided at that later instant, so
// a clock that steps back refills nothing until it has caught up.
func WithClock(now func() time.Time) Option {
	return optionFunc(func(s *Store) { s.now = now })
}

// WithSweepInterval sets how often the Store deletes buckets that have
// refilled to full and expired leases. The default is
// [DefaultSweepInterval]. Zero or a negative interval disables the sweep:
// full buckets and expired leases are then deleted only when their
// subject's buckets or lease name are next charged, and full buckets also
// when their shard reaches its bound.
func WithSweepInterval(d time.Duration) Option {
	return optionFunc(func(s *Store) { s.sweep = d })
}

// WithMaxBuckets bounds how many buckets the Store holds; the default is
// [DefaultMaxBuckets]. The bound is split evenly across the Store's 64
// shards, each holding at most ⌈n/64⌉ buckets, so [Store.Len] never exceeds
// n rounded up to a multiple of 64. An n below 64, including zero and
// negative values, is raised to 64: one bucket per shard. There is no
// unbounded setting. See the package documentation for what an eviction
// costs.
func WithMaxBuckets(n int) Option {
	return optionFunc(func(s *Store) { s.perShard = perShard(n) })
}

// perShard is the bound of each shard for a Store bound to n buckets:
// ⌈n/shardCount⌉, at least 1 and at most maxPerShard.
func perShard(n int) int {
	if n < shardCount {
		return 1
	}
	return int(min(uint64(n-1)/shardCount+1, maxPerShard))
}

// maxPerShard keeps a shard's slots within an int32 and its index's
// positions within a uint32; 64 shards of it are far more buckets than
// any machine's memory holds.
const maxPerShard = 1 << 28

// New returns an empty Store. Unless disabled with [WithSweepInterval], it
// runs one background goroutine that [Store.Close] stops.
func New(opts ...Option) *Store {
	s := &Store{
		sweep:    DefaultSweepInterval,
		perShard: perShard(DefaultMaxBuckets),
		seed:     maphash.MakeSeed(),
		stop:     make(chan struct{}),
	}
	for _, o := range opts {
		o.apply(s)
	}
	if s.now == nil {
		s.epoch = time.Now()
	} else {
		s.epoch = s.now()
	}
	for i := range s.shards {
		sh := &s.shards[i]
		sh.leases = make(map[key]map[string]int64)
	}
	if s.sweep > 0 {
		s.wg.Add(1)
		go s.sweepLoop()
	}
	return s
}

// InProcess implements [bucket.InProcess]: it returns true.
func (s *Store) InProcess() bool { return true }

// subjectHash hashes a subject. Its low bits choose the subject's shard.
func (s *Store) subjectHash(subject string) uint64 {
	return maphash.String(s.seed, subject)
}

func (s *Store) shard(subjectHash uint64) *shard {
	return &s.shards[subjectHash%shardCount]
}

// bucketHash hashes the key of subject's bucket name, given the subject's
// hash. The multiplication spreads every bit of both hashes into the high
// half, which it returns, since within one shard the subject hashes share
// their low bits. The seed is random, so callers cannot choose keys that
// collide.
func (s *Store) bucketHash(subjectHash uint64, name string) uint32 {
	hi, _ := bits.Mul64(subjectHash^maphash.String(s.seed, name), 0x9e3779b97f4a7c15)
	return uint32(hi)
}

// instant returns the present as nanoseconds since the Store's epoch. With
// the default clock it reads only the monotonic clock ([time.Since] does),
// which costs half of what [time.Now] does.
func (s *Store) instant() int64 {
	if s.now == nil {
		return int64(time.Since(s.epoch))
	}
	return int64(s.now().Sub(s.epoch))
}

// advance returns the instant at which the shard decides a call that read
// now from the clock: now, unless the shard has already decided a call at a
// later instant. Calls read the clock before they take the shard's lock, so
// one may take it after a call that read the clock later; deciding it at
// the later instant keeps every bucket's instants in order, so that none is
// ever refilled twice for the same time. The caller holds sh.mu.
func (sh *shard) advance(now int64) int64 {
	if now < sh.last {
		return sh.last
	}
	sh.last = now
	return now
}

// notApplied is the error of a call whose context was done before it
// started: it changed nothing.
func notApplied(err error) error {
	return fmt.Errorf("memstore: %w: %w", bucket.ErrNotApplied, err)
}

// Take implements [bucket.Store]. It fails only for a malformed request
// (wrapping [bucket.ErrInvalidRequest]) or a context already done (wrapping
// [bucket.ErrNotApplied] and the context's error), and in both cases
// changes nothing. It ignores req.ID and req.IDWindow: a Store never loses a
// reply (see [bucket.InProcess]), so nothing it applied is ever resent, and
// it applies every request it is sent. The decision's Buckets are written
// to req.Into when it has room for them (see [bucket.Request.Into]).
//
// Adding a bucket to a shard at its bound evicts the shard's bucket nearest
// to full (see [WithMaxBuckets]); that may be one of req's own buckets.
func (s *Store) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if err := ctx.Err(); err != nil {
		return bucket.Decision{}, notApplied(err)
	}
	if err := req.Validate(); err != nil {
		return bucket.Decision{}, err
	}
	n := len(req.Charges)
	if cap(req.Into) < n {
		// Allocate the decision's buckets now rather than under the lock.
		req.Into = make([]bucket.BucketState, n)
	}
	if n == 1 {
		// The most common request: decide's steps, without the loops,
		// the scratch space and a call.
		c := &req.Charges[0]
		subjectHash := s.subjectHash(req.Subject)
		h, k := s.bucketHash(subjectHash, c.Bucket), key{req.Subject, c.Bucket}
		sh := s.shard(subjectHash)
		now := s.instant()
		if req.Mode == bucket.ModeTake && sh.snap.valid.Load() {
			// deniedFromSnapshot's steps for one bucket, without its arrays.
			if tokens, at, ok := sh.snap.readOne(h, k); ok {
				level := c.Limit.Refill(tokens, time.Duration(max(now, at)-at))
				if _, ok := c.Apply(req.Mode, level); !ok {
					return denied(c, level, req.Into), nil
				}
			}
		}
		sh.mu.Lock()
		now = sh.advance(now)
		slot, level := sh.find(h, k), c.Limit.Capacity
		if slot >= 0 {
			e := &sh.entries[slot]
			level = c.Limit.Refill(e.tokens, time.Duration(now-e.at))
		}
		remaining, ok := c.Apply(req.Mode, level)
		if !ok {
			if slot >= 0 {
				slots := [1]int32{slot}
				sh.noteDenial(h, slots[:])
			}
			sh.mu.Unlock()
			return denied(c, level, req.Into), nil
		}
		resetAfter := c.Limit.TimeToFull(remaining)
		s.store(sh, k, h, slot, remaining, c.Limit.Capacity, now, resetAfter)
		sh.mu.Unlock()
		d := bucket.Decision{Allowed: true, Buckets: req.Into[:1]}
		d.Buckets[0] = charged(c, remaining, resetAfter)
		return d, nil
	}
	return s.decideMany(&req), nil
}

// decideMany is decide with scratch space on its stack, which a Take of
// one charge spares (its stack frame stays small, which matters with many
// goroutines).
func (s *Store) decideMany(req *bucket.Request) bucket.Decision {
	// Most requests charge a few buckets; sizing the scratch space for
	// them spares clearing it for sixteen.
	if n := len(req.Charges); n <= fewCharges {
		var w [fewCharges]chargeWork
		return s.decide(req, w[:n])
	}
	var w [bucket.MaxCharges]chargeWork
	return s.decide(req, w[:len(req.Charges)])
}

// fewCharges is how many charges most requests have at most.
const fewCharges = 4

// chargeWork is the scratch space of one charge of a Take, on its stack.
type chargeWork struct {
	// hash is the bucket's hash, and slot its slot in the shard or -1.
	hash uint32
	slot int32
	// level is the bucket's level before the charge.
	level float64
	// remaining and resetAfter are, if the charge is applied, the
	// bucket's level after it and how long it then takes to refill.
	remaining  float64
	resetAfter time.Duration
}

// charged is the state [bucket.Decide] reports for a bucket of an allowed
// request that charged it c, leaving it remaining tokens, full resetAfter
// later. A Store builds allowed decisions from the arithmetic it did under
// the lock rather than redo it with Decide (TestMatchesReference checks
// that they agree).
func charged(c *bucket.Charge, remaining float64, resetAfter time.Duration) bucket.BucketState {
	return bucket.BucketState{
		Bucket:     c.Bucket,
		Limit:      c.Limit,
		Cost:       c.Cost,
		Allowed:    true,
		Remaining:  remaining,
		ResetAfter: resetAfter,
	}
}

// denied is the decision [bucket.Decide] makes for a request of the one
// charge c, denied by a bucket holding level tokens, written to into (at
// least one long). A hot caller is denied through it, so it builds the
// decision in place rather than pass the request to Decide by value
// (TestMatchesReference checks that they agree).
func denied(c *bucket.Charge, level float64, into []bucket.BucketState) bucket.Decision {
	var retryAfter time.Duration
	if c.Cost <= c.Limit.Capacity {
		// No wait helps a cost over capacity.
		retryAfter = c.Limit.RetryAfter(level, c.Cost)
	}
	d := bucket.Decision{RetryAfter: retryAfter, Buckets: into[:1]}
	d.Buckets[0] = bucket.BucketState{
		Bucket:     c.Bucket,
		Limit:      c.Limit,
		Cost:       c.Cost,
		Remaining:  level,
		RetryAfter: retryAfter,
		ResetAfter: c.Limit.TimeToFull(level),
	}
	return d
}

// deniedFromSnapshot decides req, a take of 2 to snapMax charges whose
// buckets' hashes are hashes, from sh's snapshot, without the lock, if the
// snapshot holds exactly req's buckets (unchanged since the shard denied
// them) and they still cannot pay: then it returns the decision the
// locked path would make, and true. It decides at the later of now and
// the snapshot's instants: a call that read the clock after this one may
// hold the lock meanwhile, and this one is then decided before it. Only a
// denial is final here; a request that can pay returns false, and takes
// the lock to write.
func deniedFromSnapshot(sh *shard, req *bucket.Request, hashes *[snapMax]uint32, now int64) (bucket.Decision, bool) {
	var tokens [snapMax]float64
	var at [snapMax]int64
	if !sh.snap.read(req.Subject, req.Charges, hashes, &tokens, &at) {
		return bucket.Decision{}, false
	}
	n := len(req.Charges)
	for i := range n {
		now = max(now, at[i])
	}
	var levels [snapMax]float64
	allowed := true
	for i := range n {
		c := &req.Charges[i]
		levels[i] = c.Limit.Refill(tokens[i], time.Duration(now-at[i]))
		if _, ok := c.Apply(req.Mode, levels[i]); !ok {
			allowed = false
		}
	}
	if allowed {
		return bucket.Decision{}, false
	}
	return bucket.Decide(*req, levels[:n]), true
}

// noteDenial records that the shard denied a take of the buckets in
// slots (at most snapMax, all stored), the first of which has hash h. The
// same request denied twice in a row (as told by h and the number of
// buckets) gets the snapshot, so that the calls that keep asking for what
// it cannot pay are denied from it until it changes. The caller holds
// sh.mu.
func (sh *shard) noteDenial(h uint32, slots []int32) {
	sig := h ^ uint32(len(slots))*0x9e3779b9
	if sh.denied == sig {
		sh.snap.set(sh.entries, slots)
	}
	sh.denied = sig
}

// decide decides req, valid and with room for its decision in req.Into,
// and applies it if it is allowed. w has one element per charge.
func (s *Store) decide(req *bucket.Request, w []chargeWork) bucket.Decision {
	subjectHash := s.subjectHash(req.Subject)
	for i := range w {
		w[i].hash = s.bucketHash(subjectHash, req.Charges[i].Bucket)
	}
	sh := s.shard(subjectHash)
	// Only the lookup, the refill and the update happen under the lock;
	// the clock is read before it, and the decision is built after it
	// from what was read under it, so that a hot subject's lock is held
	// as briefly as possible.
	now := s.instant()
	var hashes [snapMax]uint32
	if req.Mode == bucket.ModeTake && len(w) <= snapMax && sh.snap.valid.Load() {
		for i := range w {
			hashes[i] = w[i].hash
		}
		if d, ok := deniedFromSnapshot(sh, req, &hashes, now); ok {
			return d
		}
	}
	sh.mu.Lock()
	allowed := s.take(sh, req, sh.advance(now), w)
	if !allowed && len(w) <= snapMax {
		// take looked every bucket up before it denied.
		var slots [snapMax]int32
		all := true
		for i := range w {
			slots[i] = w[i].slot
			all = all && w[i].slot >= 0
		}
		if all {
			sh.noteDenial(w[0].hash, slots[:len(w)])
		}
	}
	sh.mu.Unlock()
	if !allowed {
		var levels [bucket.MaxCharges]float64
		for i := range w {
			levels[i] = w[i].level
		}
		return bucket.Decide(*req, levels[:len(w)])
	}
	d := bucket.Decision{Allowed: true, Buckets: req.Into[:len(w)]}
	for i := range d.Buckets {
		d.Buckets[i] = charged(&req.Charges[i], w[i].remaining, w[i].resetAfter)
	}
	return d
}

// take refills req's buckets to now into w and decides req from them, as
// [bucket.Decide] does. If every bucket can pay, it applies req, fills in
// each charge's remaining and resetAfter, and returns true. The caller
// holds sh.mu.
func (s *Store) take(sh *shard, req *bucket.Request, now int64, w []chargeWork) bool {
	allowed := true
	for i := range w {
		c, cw := &req.Charges[i], &w[i]
		cw.slot, cw.level = sh.find(cw.hash, key{req.Subject, c.Bucket}), c.Limit.Capacity
		if cw.slot >= 0 {
			e := &sh.entries[cw.slot]
			cw.level = c.Limit.Refill(e.tokens, time.Duration(now-e.at))
		}
		ok := false
		cw.remaining, ok = c.Apply(req.Mode, cw.level)
		allowed = allowed && ok
	}
	if !allowed {
		return false
	}
	// Removing a bucket moves another into its slot, so once one is
	// removed the slots looked up above may be stale.
	stale := false
	for i := range w {
		c, cw := &req.Charges[i], &w[i]
		k, slot := key{req.Subject, c.Bucket}, cw.slot
		if stale && slot >= 0 {
			// -1 if it was evicted for an earlier charge of req.
			slot = sh.find(cw.hash, k)
		}
		cw.resetAfter = c.Limit.TimeToFull(cw.remaining)
		if s.store(sh, k, cw.hash, slot, cw.remaining, c.Limit.Capacity, now, cw.resetAfter) {
			stale = true
		}
	}
	return true
}

// store records that the bucket k, whose hash is h and which is in slot (-1
// if it is not stored), holds tokens at now, and will be full resetAfter
// later. A full bucket is deleted, and a new one added; if the shard is
// at its bound, the bucket nearest to full goes, which may be the new one
// (it is then not added). It reports whether it removed a stored bucket,
// which moves another into the removed one's slot. The caller holds sh.mu.
func (s *Store) store(sh *shard, k key, h uint32, slot int32, tokens, capacity float64, now int64, resetAfter time.Duration) (removed bool) {
	full := tokens >= capacity
	fullAt := addSaturating(now, resetAfter)
	if slot >= 0 && sh.snap.valid.Load() {
		// (Checked here, inline, so that a shard without a snapshot, the
		// common case, pays one load, not a call.)
		sh.snap.forget(h, k)
	}
	switch {
	case slot >= 0 && full:
		sh.remove(slot)
		return true
	case slot >= 0:
		e := &sh.entries[slot]
		// A charge moves fullAt later, leaving the heap key a lower
		// bound; only a refund can move it below the key.
		if fullAt < e.fullAt {
			if pos := int(e.pos); fullAt < sh.keys[pos] {
				sh.keys[pos] = fullAt
				sh.up(pos)
			}
		}
		e.tokens, e.at, e.fullAt = tokens, now, fullAt
	case full:
		// A full bucket is not stored.
	default:
		if len(sh.entries) >= s.perShard {
			root := sh.root()
			if fullAt <= sh.entries[root].fullAt {
				// The new bucket would be full first: forgetting it
				// forgets the least.
				sh.evictions++
				return false
			}
			sh.evict(root, now)
			removed = true
		}
		sh.insert(entry{key: k, tokens: tokens, at: now, fullAt: fullAt, hash: h}, s.perShard)
	}
	return removed
}

// addSaturating returns at+d for d >= 0, capped at the largest instant.
func addSaturating(at int64, d time.Duration) int64 {
	if at > math.MaxInt64-int64(d) {
		return math.MaxInt64
	}
	return at + int64(d)
}

// insert adds a bucket that is not in the shard, which holds at most bound.
// The caller holds sh.mu and has made room.
func (sh *shard) insert(e entry, bound int) {
	slot := int32(len(sh.entries))
	e.pos = int32(len(sh.heap))
	sh.entries = appendBounded(sh.entries, e, bound)
	sh.heap = appendBounded(sh.heap, slot, bound)
	sh.keys = appendBounded(sh.keys, e.fullAt, bound)
	sh.indexAdd(e.hash, slot)
	sh.up(int(e.pos))
	sh.peak = max(sh.peak, len(sh.entries))
}

// appendBounded appends v to s, growing s by a quarter when it is full, but
// never beyond room for bound elements unless it holds more already: the
// arrays of a shard at its bound have no spare room.
func appendBounded[T any](s []T, v T, bound int) []T {
	if len(s) == cap(s) {
		grown := make([]T, len(s), max(len(s)+1, min(bound, len(s)+len(s)/4+8)))
		copy(grown, s)
		s = grown
	}
	return append(s, v)
}

// evict removes the bucket in slot, the shard's root (see root), to make
// room for another. It counts an eviction unless that bucket is full by now
// anyway. The caller holds sh.mu.
func (sh *shard) evict(slot int32, now int64) {
	if sh.entries[slot].fullAt > now {
		sh.evictions++
	}
	sh.remove(slot)
}

// remove deletes the bucket in slot, moving the last bucket into its slot.
// The caller holds sh.mu.
func (sh *shard) remove(slot int32) {
	e := &sh.entries[slot]
	if sh.snap.valid.Load() {
		sh.snap.forget(e.hash, e.key)
	}
	pos, last := int(e.pos), len(sh.heap)-1
	if pos != last {
		sh.swap(pos, last)
	}
	sh.heap, sh.keys = sh.heap[:last], sh.keys[:last]
	if pos != last {
		sh.fix(pos)
	}
	sh.indexDelete(sh.indexOf(e.hash, slot))
	end := int32(len(sh.entries) - 1)
	if slot != end {
		moved := sh.entries[end]
		sh.entries[slot] = moved
		sh.heap[moved.pos] = slot
		sh.index[sh.indexOf(moved.hash, end)].slot = slot + 1
	}
	// Clear the vacated entry so that the array no longer holds its
	// strings.
	sh.entries[end] = entry{}
	sh.entries = sh.entries[:end]
}

// find returns the slot of the bucket k whose hash is h, or -1. The caller
// holds sh.mu.
func (sh *shard) find(h uint32, k key) int32 {
	if len(sh.index) == 0 {
		return -1
	}
	mask := uint32(len(sh.index) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		is := sh.index[i]
		switch {
		case is.slot == 0:
			return -1
		case is.hash == h && sh.entries[is.slot-1].key.equal(k):
			return is.slot - 1
		}
	}
}

// indexOf returns the position in the index of slot, whose hash is h. The
// caller holds sh.mu, and slot is in the index.
func (sh *shard) indexOf(h uint32, slot int32) uint32 {
	mask := uint32(len(sh.index) - 1)
	i := h & mask
	for sh.index[i].slot != slot+1 {
		i = (i + 1) & mask
	}
	return i
}

// indexAdd adds slot, whose hash is h, to the index, growing it first if
// it would be more than 3/4 full. The caller holds sh.mu, and every entry
// but slot is in the index.
func (sh *shard) indexAdd(h uint32, slot int32) {
	if 4*len(sh.entries) > 3*len(sh.index) {
		sh.rebuildIndex(max(8, 2*len(sh.index)))
		return // the rebuild added every entry, slot among them
	}
	mask := uint32(len(sh.index) - 1)
	i := h & mask
	for sh.index[i].slot != 0 {
		i = (i + 1) & mask
	}
	sh.index[i] = indexSlot{hash: h, slot: slot + 1}
}

// indexDelete empties position i of the index, then moves back the entries
// after it in its run that would no longer be found (backward-shift
// deletion), so that no tombstones are needed. The caller holds sh.mu.
func (sh *shard) indexDelete(i uint32) {
	mask := uint32(len(sh.index) - 1)
	for j := (i + 1) & mask; sh.index[j].slot != 0; j = (j + 1) & mask {
		// The entry at j may fill the hole at i only if its home position
		// is not cyclically within (i, j].
		if home := sh.index[j].hash & mask; (j-home)&mask >= (j-i)&mask {
			sh.index[i] = sh.index[j]
			i = j
		}
	}
	sh.index[i] = indexSlot{}
}

// rebuildIndex replaces the index with one of size positions (a power of
// two) holding every entry. The caller holds sh.mu.
func (sh *shard) rebuildIndex(size int) {
	sh.index = make([]indexSlot, size)
	mask := uint32(size - 1)
	for slot, e := range sh.entries {
		i := e.hash & mask
		for sh.index[i].slot != 0 {
			i = (i + 1) & mask
		}
		sh.index[i] = indexSlot{hash: e.hash, slot: int32(slot) + 1}
	}
}

// root returns the slot of the bucket that will be full soonest. It first
// raises the root's key to its bucket's fullAt and sifts it down, until the
// root's key is exact: the keys of the others are lower bounds of their
// fullAt, so none will be full sooner. Each key it raises stays exact until
// its bucket is charged again, so the work is O(log n) per charge at most.
// The caller holds sh.mu, and the shard holds a bucket.
func (sh *shard) root() int32 {
	for {
		slot := sh.heap[0]
		fullAt := sh.entries[slot].fullAt
		if sh.keys[0] == fullAt {
			return slot
		}
		sh.keys[0] = fullAt
		sh.down(0)
	}
}

func (sh *shard) swap(i, j int) {
	sh.heap[i], sh.heap[j] = sh.heap[j], sh.heap[i]
	sh.keys[i], sh.keys[j] = sh.keys[j], sh.keys[i]
	sh.entries[sh.heap[i]].pos = int32(i)
	sh.entries[sh.heap[j]].pos = int32(j)
}

// up moves the bucket at heap position i towards the root while its key is
// lower than its parent's.
func (sh *shard) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if sh.keys[parent] <= sh.keys[i] {
			return
		}
		sh.swap(i, parent)
		i = parent
	}
}

// down moves the bucket at heap position i towards the leaves while a
// child's key is lower, and reports whether it moved.
func (sh *shard) down(i int) bool {
	start, n := i, len(sh.heap)
	for {
		child := 2*i + 1
		if child >= n {
			break
		}
		if right := child + 1; right < n && sh.keys[right] < sh.keys[child] {
			child = right
		}
		if sh.keys[i] <= sh.keys[child] {
			break
		}
		sh.swap(i, child)
		i = child
	}
	return i > start
}

// fix restores the heap order after the key at heap position i changed.
func (sh *shard) fix(i int) {
	if !sh.down(i) {
		sh.up(i)
	}
}

// dropFull deletes the buckets that are full by now, nearest to full
// first. The caller holds sh.mu.
func (sh *shard) dropFull(now int64) {
	for len(sh.heap) > 0 && sh.keys[0] <= now {
		if slot := sh.root(); sh.entries[slot].fullAt <= now {
			sh.remove(slot)
		}
	}
}

// compact rebuilds the shard's storage once it holds less than a quarter of
// its peak, so that the memory a flood of subjects took comes back once the
// flood has refilled. The caller holds sh.mu.
func (sh *shard) compact() {
	const minPeak = 256
	n := len(sh.entries)
	if sh.peak < minPeak || n >= sh.peak/4 {
		return
	}
	sh.entries = append(make([]entry, 0, n+n/4), sh.entries...)
	sh.heap = append(make([]int32, 0, n+n/4), sh.heap...)
	sh.keys = append(make([]int64, 0, n+n/4), sh.keys...)
	size := 8
	for 4*(n+1) > 3*size {
		size *= 2
	}
	sh.rebuildIndex(size)
	sh.peak = n
}

// Acquire implements [bucket.LeaseStore]. It deletes the expired leases of
// req's subject and name, then renews req.ID's lease if it is live, or
// acquires it if fewer than req.Limit leases are. It fails only for a
// malformed request or a context already done, as [Store.Take] does, and
// then changes nothing. Leases do not count towards [WithMaxBuckets].
func (s *Store) Acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	if err := ctx.Err(); err != nil {
		return bucket.LeaseDecision{}, notApplied(err)
	}
	if err := req.Validate(); err != nil {
		return bucket.LeaseDecision{}, err
	}
	sh := s.shard(s.subjectHash(req.Subject))
	now := s.instant()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now = sh.advance(now)
	k := key{req.Subject, req.Name}
	set := sh.leases[k]
	dropExpired(set, now)
	d := bucket.LeaseDecision{Limit: req.Limit}
	if _, live := set[req.ID]; live || len(set) < req.Limit {
		if set == nil {
			set = make(map[string]int64, 1)
			sh.leases[k] = set
		}
		set[req.ID] = addSaturating(now, req.TTL)
		d.Acquired = true
	}
	d.InUse = len(set)
	if len(set) == 0 {
		delete(sh.leases, k)
	}
	return d, nil
}

// Release implements [bucket.LeaseStore]. It fails only for malformed
// arguments or a context already done, as [Store.Take] does, and then
// changes nothing.
func (s *Store) Release(ctx context.Context, subject, name, id string) error {
	if err := ctx.Err(); err != nil {
		return notApplied(err)
	}
	if err := bucket.ValidateLease(subject, name, id); err != nil {
		return err
	}
	sh := s.shard(s.subjectHash(subject))
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
func dropExpired(set map[string]int64, now int64) {
	for id, expires := range set {
		if now >= expires {
			delete(set, id)
		}
	}
}

// Len returns how many buckets the Store holds, that is, how many have
// been charged below capacity and have neither been seen full since nor
// evicted. It is meant for tests and metrics, and is safe for concurrent
// use.
func (s *Store) Len() int {
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		n += len(sh.entries)
		sh.mu.Unlock()
	}
	return n
}

// Evictions returns how many buckets the Store has evicted since it was
// made: buckets it forgot, before they had refilled, to make room for a new
// bucket in a shard at its bound (see [WithMaxBuckets]). A bucket deleted
// because it was full by then is not counted. It is meant for metrics, and
// is safe for concurrent use.
func (s *Store) Evictions() uint64 {
	var n uint64
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		n += sh.evictions
		sh.mu.Unlock()
	}
	return n
}

// Sweep deletes every bucket that has refilled to full by now and every
// expired lease. Since each shard keeps its buckets ordered by when they
// will be full, deleting k buckets from a shard of n costs O(k log n),
// not a scan. A shard left holding less than a quarter of its peak is
// rebuilt smaller. The background sweep calls Sweep; tests with a fake
// clock call it directly. It is safe for concurrent use.
func (s *Store) Sweep() {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		now := sh.advance(s.instant())
		sh.dropFull(now)
		sh.compact()
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
