package main

import (
	"context"
	"math"
	"math/bits"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// subBucketBits is log2 of the number of histogram buckets per power of two
// of nanoseconds: 32 buckets, so a quantile is exact to within about 3%.
const subBucketBits = 5

// histogramSize covers every positive int64 nanosecond count.
const histogramSize = (64 - subBucketBits + 1) << subBucketBits

// histogram counts latencies in log-linear buckets, so that recording one is
// a few instructions and no allocation, whatever the number of samples. The
// zero histogram is empty and ready to use. It is not safe for concurrent
// use: each caller records into its own and they are merged at the end.
type histogram struct {
	counts [histogramSize]uint64
	n      uint64
}

// bucketOf returns the index of the bucket that holds ns.
func bucketOf(ns int64) int {
	if ns < 1<<subBucketBits {
		return int(max(ns, 0))
	}
	msb := bits.Len64(uint64(ns)) - 1
	sub := int(ns>>(msb-subBucketBits)) & (1<<subBucketBits - 1)
	return (msb-subBucketBits+1)<<subBucketBits + sub
}

// bucketBounds returns the smallest and the largest nanosecond count of
// bucket i.
func bucketBounds(i int) (lo, hi int64) {
	if i < 1<<subBucketBits {
		return int64(i), int64(i)
	}
	msb := i>>subBucketBits + subBucketBits - 1
	sub := int64(i & (1<<subBucketBits - 1))
	shift := msb - subBucketBits
	lo = (1<<subBucketBits + sub) << shift
	return lo, lo + 1<<shift - 1
}

// record adds one latency.
func (h *histogram) record(d time.Duration) {
	h.counts[bucketOf(int64(d))]++
	h.n++
}

// merge adds every sample of o to h.
func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
}

// quantile returns the latency below which a fraction q of the samples
// lie, as the middle of the bucket that holds it; zero for an empty
// histogram.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			lo, hi := bucketBounds(i)
			return time.Duration(lo + (hi-lo)/2)
		}
	}
	return 0
}

// cellResult is what one run of one cell (a peer, a workload, a number of
// callers) measured.
type cellResult struct {
	// ops is the number of decisions made (allowed, denied or failed).
	ops uint64
	// allowed, denied and errs split ops by outcome.
	allowed, denied, errs uint64
	// elapsed is the wall time from the first caller's start to the last
	// caller's return.
	elapsed time.Duration
	// hist holds the latency of every decision.
	hist histogram
	// firstErr is the first error a caller got, if any.
	firstErr error
	// mallocs is the number of heap allocations the whole process made
	// during the run (runtime.MemStats.Mallocs), every goroutine included.
	mallocs uint64
	// cpu is the CPU time (user and system) the whole process used during
	// the run, every thread included: the peer, its client library and the
	// harness's callers.
	cpu time.Duration
}

// add adds o's decisions, latencies, time and costs to r, as if r had
// gone on to measure what o did.
func (r *cellResult) add(o *cellResult) {
	r.ops += o.ops
	r.allowed += o.allowed
	r.denied += o.denied
	r.errs += o.errs
	r.elapsed += o.elapsed
	r.hist.merge(&o.hist)
	if r.firstErr == nil {
		r.firstErr = o.firstErr
	}
	r.mallocs += o.mallocs
	r.cpu += o.cpu
}

// rate returns decisions per second.
func (r *cellResult) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.ops) / r.elapsed.Seconds()
}

// callerStats is one caller goroutine's tally; each caller owns one, so
// that recording needs no synchronisation.
type callerStats struct {
	hist                  histogram
	allowed, denied, errs uint64
	firstErr              error
}

// opFunc makes the i-th decision of caller number caller (i = 0, 1, 2…);
// it must be safe for concurrent use.
type opFunc func(ctx context.Context, caller, i int) (allowed bool, err error)

// drive runs callers goroutines that call op back to back for d and
// returns what they measured. It stops early when ctx is done. Every
// call's context is ctx: the peers bound their own calls.
func drive(ctx context.Context, callers int, d time.Duration, op opFunc) *cellResult {
	stats := make([]callerStats, callers)
	var stop atomic.Bool
	var wg sync.WaitGroup
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	cpuBefore := processCPU()
	start := time.Now()
	timer := time.AfterFunc(d, func() { stop.Store(true) })
	defer timer.Stop()
	cancelWatch := context.AfterFunc(ctx, func() { stop.Store(true) })
	defer cancelWatch()
	for c := range callers {
		wg.Go(func() {
			st := &stats[c]
			for i := 0; !stop.Load(); i++ {
				t := time.Now()
				ok, err := op(ctx, c, i)
				st.hist.record(time.Since(t))
				switch {
				case err != nil:
					st.errs++
					if st.firstErr == nil {
						st.firstErr = err
					}
				case ok:
					st.allowed++
				default:
					st.denied++
				}
			}
		})
	}
	wg.Wait()
	res := &cellResult{elapsed: time.Since(start), cpu: processCPU() - cpuBefore}
	runtime.ReadMemStats(&after)
	res.mallocs = after.Mallocs - before.Mallocs
	for i := range stats {
		st := &stats[i]
		res.hist.merge(&st.hist)
		res.allowed += st.allowed
		res.denied += st.denied
		res.errs += st.errs
		if res.firstErr == nil {
			res.firstErr = st.firstErr
		}
	}
	res.ops = res.allowed + res.denied + res.errs
	return res
}

// median returns the median of xs (the mean of the middle two for an even
// count), ignoring NaNs, which stand for "not measured"; NaN if none is
// left.
func median(xs []float64) float64 {
	xs = slices.DeleteFunc(slices.Clone(xs), math.IsNaN)
	if len(xs) == 0 {
		return math.NaN()
	}
	slices.Sort(xs)
	mid := len(xs) / 2
	if len(xs)%2 == 1 {
		return xs[mid]
	}
	return (xs[mid-1] + xs[mid]) / 2
}

// processCPU returns the CPU time, user and system, the process has used so
// far, or 0 if the system does not say.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
