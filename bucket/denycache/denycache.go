// Package denycache is a local denial cache in front of a [bucket.Store]:
// once the store has denied a subject's bucket, the [Store] denies that
// bucket again in this process, without calling the store, until the
// bucket could pay, so that an abusive caller costs no Redis round trip.
//
// # How a request is judged
//
// When the wrapped store denies a [bucket.ModeTake] request, the Store
// keeps an entry for every bucket the request named (subject, bucket name,
// limit): the level the store reported, and the instant, on the Store's
// clock, at which the call was sent. A later ModeTake request is answered
// in process when some bucket it names has an entry whose limit equals the
// charge's and whose predicted level cannot pay the charge's cost. The
// prediction is the reported level refilled with [bucket.Limit.Refill] to
// the present, less the cost of calls the Store has passed to the store
// for that bucket and not yet had answered; the denial is [bucket.Decide]
// on the predicted levels, so it is shaped as the store's would be:
// Remaining is the predicted level, and RetryAfter the wait until it pays
// the cost asked, for that cost and no other. A bucket the request names
// but the Store has no entry for is reported full (the most the store
// could report); the denial never rests on it. A read (a request whose
// every cost is zero) asks for the levels, which the entries only bound,
// so it always goes to the store. Every other request goes
// to the store, and its answer refreshes the entries: a denial creates or
// updates them, an allowed answer updates the entries that exist (it
// creates none, so that callers who are never denied cost no memory).
// Answers are applied in the order their calls were sent, so a slow reply
// never overwrites what a later call reported.
//
// The prediction measures the time since the call was sent, not since the
// store decided, so it is never lower than the store's level unless
// something outside this Store returned tokens (see below): a local denial
// ends at the latest when the store would allow, up to one round trip
// earlier.
//
// # In-flight cost
//
// When a bucket's predicted level first pays, every concurrent caller
// would go to the store at once (a thundering herd at the refill instant).
// The Store counts the cost of the calls it has sent for each known bucket
// and not yet had answered, and subtracts it from the prediction: only as
// much as the bucket can pay goes to the store, and the rest is denied
// locally, as the store would deny it if those calls are charged. If a call
// in flight is denied by the store, or fails, the requests denied on its
// account were denied wrongly; and a reply that already includes the
// charge of a call still in flight counts that charge twice until the
// call's own reply. Either is an under-admission lasting at most one round
// trip.
//
// # What the cache can get wrong
//
// The Store only ever denies: whatever it passes to the store, the store
// decides, so it never admits a request the store would deny. It can deny
// one the store would allow (under-admission) when tokens come back in a
// way it does not see:
//
//   - A refund or reset made through another instance (or another wrapper
//     of the same store) is not seen. The entry keeps denying on the old
//     level until that level would have refilled enough for the cost
//     asked: for the cost the store denied, until its RetryAfter, and for
//     any cost up to the capacity, never longer than the bucket takes to
//     refill to full from the reported level (the denial's ResetAfter),
//     when the entry expires. A limit change is seen: an entry judges only
//     charges with the limit it was written with.
//   - A [bucket.ModeAdjust] request through this Store (a settlement or a
//     refund) invalidates the entries of its subject's buckets before it is
//     sent, and its reply sets them to the adjusted levels. Calls sent
//     before that reply never overwrite the result, but a call sent while
//     the adjustment was in flight that the store applied before it may
//     report a level without the refund: an under-admission bounded as for
//     a refund elsewhere. (To keep this rare, a reply to a call sent
//     before the latest adjustment of its shard was answered creates no
//     entry.)
//   - Cost in flight that is not charged (above).
//
// A store error changes no entry: a call that may have been applied only
// lowered the levels, so the entries stay upper bounds.
//
// # Request IDs
//
// The Store never reports [bucket.Decision.Duplicate] itself: a request it
// denies was not applied, and the same ID sent again is judged afresh, by
// the entries or by the store. A request whose ID the store may already
// have applied always goes to the store, which reports the duplicate,
// whatever the levels:
//
//   - a request whose subject and ID were sent through this Store and
//     failed with an error for which [bucket.MayHaveApplied] is true (a
//     lost reply), until the store answers a request with that subject and
//     ID or the request's [bucket.Request.IDWindow] passes, so that
//     resending after an unknown outcome works as with the store alone;
//   - a request with the subject and ID of one of the last 512 requests of
//     its shard that the store allowed through this Store.
//
// A repeat of an ID the store allowed longer ago than that (whose allowed
// reply the caller therefore already had) may be denied locally instead of
// reported as a duplicate. Callers resend only after an unknown outcome,
// which the first rule covers for the whole ID window. Subjects and IDs are
// remembered by a 64-bit hash: a collision only sends a request to the
// store.
//
// # Memory
//
// Entries live in 64 shards selected by a hash of the subject, so that all
// buckets of one request sit in one shard and are judged under one lock. An
// entry expires once its bucket would be full again (or one second after
// it was written, whichever is later; an entry invalidated by an adjustment
// lives at least a minute, so that it can still refuse late replies). An
// expired entry is deleted when it is next looked up, when its shard next
// passes a call to the store (every shard sweeps itself at most once a
// minute), or when room is needed. The Store holds at most
// [WithMaxEntries] entries; see that option for what an eviction costs. It
// starts no goroutine and needs no closing.
//
// # Composition
//
// Put the Store in front of a remote store, outside its circuit breaker
// (package [github.com/connectlimit/connectlimit/bucket/breaker]):
// denycache.New(breaker.New(redis)). Then local denials
// go on while the breaker is open, and they never count as store successes
// that would keep the breaker from opening. An in-process store (see
// [bucket.InProcess]) gains nothing from it: its call costs no round trip.
package denycache

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"sync"
	"time"
	"unsafe"

	"github.com/connectlimit/connectlimit/bucket"
)

var (
	_ bucket.Store      = (*Store)(nil)
	_ bucket.LeaseStore = (*Store)(nil)
	_ bucket.InProcess  = (*Store)(nil)
)

// shardCount is a power of two well above the core counts we run on, so two
// busy callers rarely share a lock.
const shardCount = 64

// sweepInterval is how often a shard deletes its expired entries and IDs,
// at most, when it passes a call to the store.
const sweepInterval = time.Minute

// minEntryLife is how long an entry lives at least, even for a bucket
// already full: it still denies a cost over the bucket's capacity.
const minEntryLife = time.Second

// invalidLife is how long an entry invalidated by an adjustment lives at
// least, so that it refuses the replies of calls sent before the
// adjustment's reply; the store's own timeout ends them sooner.
const invalidLife = time.Minute

// evictSamples is how many entries a full shard looks at to choose the one
// to drop.
const evictSamples = 8

// recentIDs is how many IDs of applied requests each shard remembers, so
// that a repeat goes to the store, which reports it a duplicate.
const recentIDs = 512

// Store is a [bucket.Store] and [bucket.LeaseStore] that wraps another
// store and denies locally the requests it knows the store would deny; see
// the package documentation. Build one with [New]. It is safe for
// concurrent use. A request it denies costs one lock of its subject's
// shard and the [bucket.Decision] it returns; a request it passes costs
// two locks besides the store's call.
type Store struct {
	store    bucket.Store
	leases   bucket.LeaseStore // nil if store is not a bucket.LeaseStore
	noLeases error
	now      func() time.Time
	// epoch is the instant the Store was made. Instants are kept as
	// nanoseconds since epoch, measured on the monotonic clock when the
	// clock is real.
	epoch    time.Time
	perShard int
	seed     maphash.Seed
	shards   [shardCount]shard
}

// key names one bucket of one subject.
type key struct {
	subject, bucket string
}

// entry is what the Store knows of one bucket: its level at an instant,
// and the cost of the calls in flight against it.
type entry struct {
	limit bucket.Limit
	// level is the bucket's level as the store reported it, at instant at:
	// the nanoseconds since the Store's epoch at which the reporting call
	// was sent.
	level float64
	at    int64
	// expires is when the entry may be deleted, in nanoseconds since the
	// epoch.
	expires int64
	// seq is the shard's sequence number of the call that last wrote the
	// entry; a reply to a call sent earlier does not overwrite it.
	seq uint64
	// inflight is the cost of the pending calls passed to the store while
	// the entry was valid and not yet answered.
	inflight float64
	pending  int
	// invalid is set by an adjustment: the level is unknown until a reply
	// to a later call sets it.
	invalid bool
}

type shardState struct {
	mu      sync.Mutex
	entries map[key]*entry
	// doubts holds the requests (by the hash of subject and ID, see
	// idHash) whose outcome is unknown, each until the nanosecond its ID
	// window ends. While the map is full, doubtAll makes every ID doubtful
	// until that nanosecond.
	doubts   map[uint64]int64
	doubtAll int64
	// applied holds the last recentIDs requests (by idHash) that the store
	// applied through the shard, and ring the same in the order they came,
	// next being the slot of the oldest.
	applied map[uint64]struct{}
	ring    []uint64
	next    int
	// seq numbers the calls the shard sends to the store, and adjusted is
	// the number of the last adjustment's reply: a reply to a call sent
	// before it creates no entry.
	seq, adjusted uint64
	nextSweep     int64

	localDenials, storeCalls, storeDenials, evictions uint64
}

type shard struct {
	shardState
	// The padding keeps neighbouring shards' locks on different cache
	// lines.
	_ [(cacheLine - unsafe.Sizeof(shardState{})%cacheLine) % cacheLine]byte
}

// cacheLine is the cache line size of the processors we run on, in bytes.
const cacheLine = 64

// New returns a Store around store, which is required, with no entries.
// The Store forwards [bucket.LeaseStore] calls when store implements it,
// and answers [bucket.InProcess] as store does.
//
// A Store always has Acquire and Release methods, so it always satisfies
// [bucket.LeaseStore]; when store does not, they fail with an error
// wrapping [errors.ErrUnsupported] and [bucket.ErrNotApplied].
func New(store bucket.Store, opts ...Option) *Store {
	cfg := config{now: time.Now, maxEntries: DefaultMaxEntries}
	for _, o := range opts {
		o.apply(&cfg)
	}
	s := &Store{
		store:    store,
		now:      cfg.now,
		perShard: (max(cfg.maxEntries, shardCount) + shardCount - 1) / shardCount,
		seed:     maphash.MakeSeed(),
	}
	s.epoch = s.now()
	for i := range s.shards {
		s.shards[i].entries = make(map[key]*entry)
	}
	s.leases, _ = store.(bucket.LeaseStore)
	if s.leases == nil {
		s.noLeases = fmt.Errorf("denycache: the wrapped store %T is not a bucket.LeaseStore: %w: %w", store, errors.ErrUnsupported, bucket.ErrNotApplied)
	}
	return s
}

// Take implements [bucket.Store]. It denies a [bucket.ModeTake] request
// without calling the wrapped store when a bucket it names is known not to
// be able to pay (see the package documentation), and otherwise returns
// what the wrapped store returns. A malformed request, or one whose
// context is done, always goes to the wrapped store, which reports it.
func (s *Store) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	hs := maphash.String(s.seed, req.Subject)
	sh := &s.shards[hs%shardCount]
	if err := req.Validate(); err != nil {
		sh.mu.Lock()
		sh.storeCalls++
		sh.mu.Unlock()
		return s.store.Take(ctx, req)
	}
	var id uint64
	if req.ID != "" {
		id = s.idHash(hs, req.ID)
	}
	if req.Mode == bucket.ModeAdjust {
		return s.adjust(ctx, sh, req, id)
	}
	return s.take(ctx, sh, req, id)
}

// idHash returns the hash of a request ID of the subject of hash hs: never
// zero. A collision only sends a request to the store.
func (s *Store) idHash(hs uint64, id string) uint64 {
	h := (hs*0x9e3779b97f4a7c15 + 1) ^ maphash.String(s.seed, id)
	return max(h, 1)
}

// nanos returns the present in nanoseconds since the Store's epoch.
func (s *Store) nanos() int64 { return int64(s.now().Sub(s.epoch)) }

// take judges a valid ModeTake request, whose ID hashes to id (zero
// without an ID), and passes it to the store unless it can deny it.
func (s *Store) take(ctx context.Context, sh *shard, req bucket.Request, id uint64) (bucket.Decision, error) {
	now := s.nanos()
	// held are the entries the call reserves its cost on, by charge.
	var held [bucket.MaxCharges]*entry
	live := ctx.Err() == nil
	sh.mu.Lock()
	if live {
		if d, ok := sh.judge(req, id, now, &held); ok {
			sh.localDenials++
			sh.mu.Unlock()
			return d, nil
		}
	}
	sh.seq++
	seq := sh.seq
	sh.storeCalls++
	sh.mu.Unlock()

	d, err := s.store.Take(ctx, req)

	sh.mu.Lock()
	defer sh.mu.Unlock()
	for i, e := range held[:len(req.Charges)] {
		if e != nil {
			e.release(req.Charges[i].Cost)
		}
	}
	if err != nil {
		if id != 0 && bucket.MayHaveApplied(err) {
			sh.doubt(id, now, satAdd(now, req.Window()), s.perShard)
		}
		return d, err
	}
	sh.answered(id, d.Allowed)
	if !d.Allowed {
		sh.storeDenials++
	}
	if len(d.Buckets) == len(req.Charges) {
		for i, b := range d.Buckets {
			k := key{req.Subject, req.Charges[i].Bucket}
			e := sh.entries[k]
			switch {
			case e == nil && (d.Allowed || seq < sh.adjusted):
				// An allowed bucket needs no entry. An adjustment answered
				// since the call was sent may be missing from its level.
				continue
			case e == nil:
				e = sh.insert(k, now, s.perShard)
			case seq < e.seq:
				continue
			}
			e.set(req.Charges[i].Limit, b.Remaining, now, seq)
		}
	}
	sh.sweep(now)
	return d, err
}

// judge returns the local denial of req, whose ID hashes to id, at now and
// true if some bucket it names is known not to be able to pay, and req is
// neither a read nor a request whose ID may have been applied. Otherwise
// it reserves req's cost on every known bucket, noting each in held, and
// returns false. The caller holds sh.mu.
func (sh *shard) judge(req bucket.Request, id uint64, now int64, held *[bucket.MaxCharges]*entry) (bucket.Decision, bool) {
	var tokens [bucket.MaxCharges]float64
	known, read := false, true
	for i, c := range req.Charges {
		read = read && c.Cost == 0
		tokens[i] = c.Limit.Capacity
		k := key{req.Subject, c.Bucket}
		e := sh.entries[k]
		if e == nil {
			continue
		}
		if e.expires <= now && e.pending == 0 {
			delete(sh.entries, k)
			continue
		}
		if e.invalid || e.limit != c.Limit {
			continue
		}
		tokens[i] = e.limit.Refill(e.level, time.Duration(now-e.at)) - e.inflight
		held[i] = e
		known = true
	}
	if known && !read {
		// A read asks for the levels, which the entries only bound. A
		// request whose ID may have been applied is the store's to
		// answer: a duplicate is allowed whatever the levels.
		if d := bucket.Decide(req, tokens[:len(req.Charges)]); !d.Allowed && (id == 0 || !sh.mayHaveApplied(id, now)) {
			return d, true
		}
	}
	for i, e := range held[:len(req.Charges)] {
		if e != nil {
			e.inflight += req.Charges[i].Cost
			e.pending++
		}
	}
	return bucket.Decision{}, false
}

// adjust passes a valid ModeAdjust request to the store, invalidating the
// entries of its buckets while it is in flight and setting them to the
// adjusted levels when it succeeds.
func (s *Store) adjust(ctx context.Context, sh *shard, req bucket.Request, id uint64) (bucket.Decision, error) {
	now := s.nanos()
	sh.mu.Lock()
	sh.seq++
	sh.invalidate(req, now)
	sh.storeCalls++
	sh.mu.Unlock()

	d, err := s.store.Take(ctx, req)

	sh.mu.Lock()
	defer sh.mu.Unlock()
	// A reply to a call sent before this one's reply may not include the
	// adjustment: number this reply after every such call.
	sh.seq++
	sh.adjusted = sh.seq
	if err != nil || len(d.Buckets) != len(req.Charges) {
		if id != 0 && bucket.MayHaveApplied(err) {
			sh.doubt(id, now, satAdd(now, req.Window()), s.perShard)
		}
		sh.invalidate(req, now)
		return d, err
	}
	sh.answered(id, d.Allowed)
	for i, b := range d.Buckets {
		if e := sh.entries[key{req.Subject, req.Charges[i].Bucket}]; e != nil {
			e.set(req.Charges[i].Limit, b.Remaining, now, sh.seq)
		}
	}
	sh.sweep(now)
	return d, nil
}

// invalidate marks the entries of req's buckets invalid as of the shard's
// current sequence number. The caller holds sh.mu.
func (sh *shard) invalidate(req bucket.Request, now int64) {
	for _, c := range req.Charges {
		if e := sh.entries[key{req.Subject, c.Bucket}]; e != nil {
			e.invalid = true
			e.seq = sh.seq
			e.expires = max(e.expires, satAdd(now, invalidLife))
		}
	}
}

// set records that the bucket held level tokens at instant at, as reported
// by the call numbered seq.
func (e *entry) set(limit bucket.Limit, level float64, at int64, seq uint64) {
	e.limit, e.level, e.at, e.seq, e.invalid = limit, level, at, seq, false
	e.expires = satAdd(at, max(limit.TimeToFull(level), minEntryLife))
}

// release ends the reservation of cost by a call in flight.
func (e *entry) release(cost float64) {
	e.pending--
	if e.pending <= 0 {
		// Exactly zero, whatever the rounding of the sums.
		e.pending, e.inflight = 0, 0
		return
	}
	e.inflight -= cost
}

// insert adds an empty entry for k, first making room if the shard is
// full. The caller holds sh.mu.
func (sh *shard) insert(k key, now int64, perShard int) *entry {
	if len(sh.entries) >= perShard {
		sh.evict(now)
	}
	e := &entry{}
	sh.entries[k] = e
	return e
}

// evict deletes one entry: an expired one if the first few it looks at
// hold one, else of those, the one that expires first. The caller holds
// sh.mu.
func (sh *shard) evict(now int64) {
	var victim key
	soonest, n := int64(math.MaxInt64), 0
	for k, e := range sh.entries {
		if e.expires <= now && e.pending == 0 {
			delete(sh.entries, k)
			return
		}
		if e.expires < soonest || n == 0 {
			victim, soonest = k, e.expires
		}
		if n++; n == evictSamples {
			break
		}
	}
	if n > 0 {
		delete(sh.entries, victim)
		sh.evictions++
	}
}

// sweep deletes the shard's expired entries and IDs, at most once per
// sweepInterval. The caller holds sh.mu.
func (sh *shard) sweep(now int64) {
	if now < sh.nextSweep {
		return
	}
	sh.nextSweep = satAdd(now, sweepInterval)
	for k, e := range sh.entries {
		if e.expires <= now && e.pending == 0 {
			delete(sh.entries, k)
		}
	}
	for k, until := range sh.doubts {
		if until <= now {
			delete(sh.doubts, k)
		}
	}
}

// doubt records at now that the outcome of the request id is unknown
// until the nanosecond until. If the shard holds perShard live IDs already,
// every ID of the shard is doubtful until then instead. The caller holds
// sh.mu.
func (sh *shard) doubt(id uint64, now, until int64, perShard int) {
	if sh.doubts == nil {
		sh.doubts = make(map[uint64]int64)
	}
	if prev, ok := sh.doubts[id]; ok {
		sh.doubts[id] = max(prev, until)
		return
	}
	if len(sh.doubts) >= perShard {
		for k, u := range sh.doubts {
			if u <= now {
				delete(sh.doubts, k)
			}
		}
	}
	if len(sh.doubts) >= perShard {
		sh.doubtAll = max(sh.doubtAll, until)
		return
	}
	sh.doubts[id] = until
}

// answered records that the store answered the request id (zero for none):
// its outcome is no longer in doubt, and if allowed, the store applied it.
// The caller holds sh.mu.
func (sh *shard) answered(id uint64, allowed bool) {
	if id == 0 {
		return
	}
	if len(sh.doubts) > 0 {
		delete(sh.doubts, id)
	}
	if !allowed {
		return
	}
	if sh.applied == nil {
		sh.applied = make(map[uint64]struct{}, recentIDs)
		sh.ring = make([]uint64, recentIDs)
	}
	if _, ok := sh.applied[id]; ok {
		return
	}
	if old := sh.ring[sh.next]; old != 0 {
		delete(sh.applied, old)
	}
	sh.ring[sh.next] = id
	sh.applied[id] = struct{}{}
	sh.next = (sh.next + 1) % recentIDs
}

// mayHaveApplied reports whether the store may have applied the request id
// already: its outcome was unknown less than its window ago, or the store
// allowed it recently. The caller holds sh.mu.
func (sh *shard) mayHaveApplied(id uint64, now int64) bool {
	if _, ok := sh.applied[id]; ok || now < sh.doubtAll {
		return true
	}
	until, ok := sh.doubts[id]
	if ok && until <= now {
		delete(sh.doubts, id)
		return false
	}
	return ok
}

// satAdd returns t + d, saturating at the largest int64.
func satAdd(t int64, d time.Duration) int64 {
	if int64(d) > math.MaxInt64-t {
		return math.MaxInt64
	}
	return t + int64(d)
}

// Acquire implements [bucket.LeaseStore] by calling the wrapped store: the
// Store caches nothing of leases. It fails with an error wrapping
// [errors.ErrUnsupported] and [bucket.ErrNotApplied] if the wrapped store
// is not a [bucket.LeaseStore].
func (s *Store) Acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	if s.leases == nil {
		return bucket.LeaseDecision{}, s.noLeases
	}
	return s.leases.Acquire(ctx, req)
}

// Release implements [bucket.LeaseStore] as [Store.Acquire] does.
func (s *Store) Release(ctx context.Context, subject, name, id string) error {
	if s.leases == nil {
		return s.noLeases
	}
	return s.leases.Release(ctx, subject, name, id)
}

// InProcess implements [bucket.InProcess]: it reports whether the wrapped
// store keeps its state in this process (see [bucket.IsInProcess]).
func (s *Store) InProcess() bool { return bucket.IsInProcess(s.store) }

// Stats counts what a [Store] has done since it was made.
type Stats struct {
	// LocalDenials counts Take calls the Store denied without calling the
	// wrapped store.
	LocalDenials uint64
	// StoreCalls counts Take calls passed to the wrapped store, in either
	// mode, whatever their outcome. StoreCalls / (LocalDenials +
	// StoreDenials) is the store calls paid per denied call.
	StoreCalls uint64
	// StoreDenials counts Take calls the wrapped store denied.
	StoreDenials uint64
	// Evictions counts entries dropped before they expired to keep within
	// [WithMaxEntries]. One that keeps rising means the bound is too small
	// for the traffic; each costs at most one store call.
	Evictions uint64
	// Entries is how many entries the Store holds now, counting expired
	// ones not yet deleted.
	Entries int
}

// Stats returns the Store's counters. Each shard is read at one instant,
// but not all shards at the same one. It is safe for concurrent use.
func (s *Store) Stats() Stats {
	var st Stats
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		st.LocalDenials += sh.localDenials
		st.StoreCalls += sh.storeCalls
		st.StoreDenials += sh.storeDenials
		st.Evictions += sh.evictions
		st.Entries += len(sh.entries)
		sh.mu.Unlock()
	}
	return st
}
