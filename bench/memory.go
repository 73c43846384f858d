package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// idleLimit is the limit of the memory sections' "active" buckets: one
// token taken from a capacity of 100 refills in 1,000 s, so that no bucket
// refills to full (and is deleted, or expires) while the others load.
var idleLimit = limitSpec{Capacity: 100, RefillPerSecond: 0.001}

// oneBucket and threeBuckets are the bucket names of each identity in the
// memory sections.
var (
	oneBucket    = []string{"search"}
	threeBuckets = []string{"requests", "tokens", "all"}
)

// loadWorkers is how many goroutines load identities into a Redis peer.
const loadWorkers = 64

// load makes one decision for each identity, with loadWorkers goroutines,
// and returns the number of errors and denials (both should be zero) and
// the first error. It fails only if ctx ends or every decision failed.
func load(ctx context.Context, p peer, ids []string) (errs, denied uint64, first, err error) {
	var next, nErrs, nDenied atomic.Uint64
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range loadWorkers {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= uint64(len(ids)) {
					return
				}
				ok, err := p.decide(ctx, w, ids[i])
				switch {
				case err != nil:
					nErrs.Add(1)
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				case !ok:
					nDenied.Add(1)
				}
			}
		})
	}
	wg.Wait()
	errs, denied = nErrs.Load(), nDenied.Load()
	if first != nil && errs == uint64(len(ids)) {
		return errs, denied, first, fmt.Errorf("every decision failed, the first with: %w", first)
	}
	return errs, denied, first, ctx.Err()
}

// redisMemoryShape is one case of the Redis memory section.
type redisMemoryShape struct {
	workload string
	buckets  []string
	limit    limitSpec
	// full waits fullWait after the load, so that every bucket has
	// refilled to full.
	full bool
}

// redisMemory measures the bytes of Redis memory (used_memory) a Redis
// peer spends per bucket, over ids: one bucket per identity, three, and one
// bucket that has refilled to full. It flushes the server (which this
// program started) before and after.
func redisMemory(ctx context.Context, rs *redisServer, names []string, ids []string, base limitSpec, pool int, log io.Writer) ([]row, error) {
	shapes := []redisMemoryShape{
		{workload: "1 bucket/identity, active", buckets: oneBucket, limit: idleLimit},
		{workload: "3 buckets/identity, active", buckets: threeBuckets, limit: idleLimit},
		{workload: "1 bucket/identity, full (2 s after the last take)", buckets: oneBucket, limit: base, full: true},
	}
	var rows []row
	for _, shape := range shapes {
		cl := math.NaN()
		start := len(rows)
		for _, name := range names {
			r := newRow("Redis memory", name, shape.workload, 0)
			bytes, err := redisBytesPerBucket(ctx, rs, name, ids, shape, pool, log)
			if err != nil {
				return nil, fmt.Errorf("%s, %s: %w", name, shape.workload, err)
			}
			r.bytesPer = bytes
			if name == peerRedisStore {
				cl = bytes
			}
			rows = append(rows, r)
		}
		for i := start; cl >= 0 && i < len(rows); i++ {
			if rows[i].bytesPer > 0 {
				rows[i].ratioBytes = cl / rows[i].bytesPer
			}
		}
	}
	return rows, rs.flush(ctx)
}

// redisBytesPerBucket loads one identity after another into a new peer
// called name and returns the growth of used_memory per bucket. Both
// readings of used_memory are taken with the peer's connections closed, so
// that the clients' query and output buffers (which follow the traffic,
// and shrink while a connection idles) do not count.
func redisBytesPerBucket(ctx context.Context, rs *redisServer, name string, ids []string, shape redisMemoryShape, pool int, log io.Writer) (float64, error) {
	cfg := peerConfig{limit: shape.limit, buckets: shape.buckets, addr: rs.srv.Addr(), pool: pool, callers: loadWorkers}
	// Load the peer's script before the baseline (FLUSHALL keeps
	// scripts), so that it does not count.
	warm, err := newPeer(name, cfg)
	if err != nil {
		return 0, err
	}
	_, _, _, err = load(ctx, warm, ids[:min(len(ids), loadWorkers)])
	_ = warm.close()
	if err != nil {
		return 0, err
	}
	if err := rs.flush(ctx); err != nil {
		return 0, err
	}
	if err := sleep(ctx, connectionsClosed); err != nil {
		return 0, err
	}
	before, err := rs.usedMemory(ctx)
	if err != nil {
		return 0, err
	}
	began := time.Now()
	p, err := newPeer(name, cfg)
	if err != nil {
		return 0, err
	}
	errs, denied, first, err := load(ctx, p, ids)
	_ = p.close()
	if err != nil {
		return 0, err
	}
	if errs+denied > 0 {
		fmt.Fprintf(log, "bench: %s, %s: %d errors (the first: %v) and %d denials while loading %d identities; the figure counts only what was stored\n",
			name, shape.workload, errs, first, denied, len(ids))
	}
	wait := connectionsClosed
	if shape.full {
		wait = fullWait
	}
	if err := sleep(ctx, wait); err != nil {
		return 0, err
	}
	after, err := rs.usedMemory(ctx)
	if err != nil {
		return 0, err
	}
	keys, _ := rs.dbSize(ctx)
	fmt.Fprintf(log, "bench: Redis memory, %s, %s: %d identities loaded and measured in %v, %d keys, used_memory %+d bytes\n",
		name, shape.workload, len(ids), time.Since(began).Round(time.Millisecond), keys, after-before)
	return float64(after-before) / float64(len(ids)*len(shape.buckets)), rs.flush(ctx)
}

// connectionsClosed is how long Redis is given to free the connections of
// a closed client.
const connectionsClosed = 200 * time.Millisecond

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// fullWait is how long the "refilled to full" case waits after its last
// take before it reads used_memory: at the default limit (capacity 100,
// refill 10/s) every bucket is full 0.1 s after its take, so each has been
// full for at least 1.9 s, and whatever a peer still keeps for it then, its
// keys not yet expired or not yet reclaimed by Redis, counts.
const fullWait = 2 * time.Second

// allocSubjects is how many subjects the many-users allocation count
// cycles over.
const allocSubjects = 1000

// heapMemory measures, for memstore and the x/time/rate map, the heap bytes
// per bucket over ids (one and three buckets per identity; the identity
// strings are made beforehand, and count for neither) and the heap
// allocations per decision with testing.AllocsPerRun (over many users, and
// on one hot user).
func heapMemory(ctx context.Context, names []string, ids, users []string, base limitSpec) ([]row, error) {
	var rows []row
	for _, shape := range []struct {
		workload string
		buckets  []string
	}{{"1 bucket/identity, active", oneBucket}, {"3 buckets/identity, active", threeBuckets}} {
		start := len(rows)
		cl := -1.0
		for _, name := range names {
			bytes, err := heapBytesPerBucket(ctx, name, ids, shape.buckets)
			if err != nil {
				return nil, fmt.Errorf("%s, %s: %w", name, shape.workload, err)
			}
			r := newRow("heap memory", name, shape.workload, 0)
			r.bytesPer = bytes
			if name == peerMemStore {
				cl = bytes
			}
			rows = append(rows, r)
		}
		for i := start; cl >= 0 && i < len(rows); i++ {
			if rows[i].bytesPer > 0 {
				rows[i].ratioBytes = cl / rows[i].bytesPer
			}
		}
	}
	for _, hot := range []bool{false, true} {
		for _, name := range names {
			p, err := newPeer(name, peerConfig{limit: base, buckets: oneBucket})
			if err != nil {
				return nil, err
			}
			// Many users cycle over subjects that already have their
			// bucket, so that the count is that of a steady state.
			subjects := users[:min(len(users), allocSubjects)]
			for _, s := range subjects {
				_, _ = p.decide(ctx, 0, s)
			}
			i := 0
			allocs := testing.AllocsPerRun(10_000, func() {
				subject := subjects[0]
				if !hot {
					subject = subjects[i%len(subjects)]
					i++
				}
				_, _ = p.decide(ctx, 0, subject)
			})
			_ = p.close()
			workload := "allocs, many users"
			if hot {
				workload = "allocs, one hot user"
			}
			r := newRow("heap memory", name, workload, 1)
			r.allocs = allocs
			rows = append(rows, r)
		}
	}
	return rows, nil
}

// heapBytesPerBucket returns how much the live heap grows per bucket when
// the peer called name holds one bucket per name of buckets for each of
// ids.
func heapBytesPerBucket(ctx context.Context, name string, ids []string, buckets []string) (float64, error) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	// memstore evicts beyond its bound: make room for every bucket.
	p, err := newPeer(name, peerConfig{limit: idleLimit, buckets: buckets, maxBuckets: 2 * len(ids) * len(buckets)})
	if err != nil {
		return 0, err
	}
	defer func() { _ = p.close() }()
	for _, id := range ids {
		if ok, err := p.decide(ctx, 0, id); err != nil || !ok {
			return 0, fmt.Errorf("loading %s: allowed %v, error %w", id, ok, err)
		}
	}
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(p)
	return (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / float64(len(ids)*len(buckets)), nil
}
