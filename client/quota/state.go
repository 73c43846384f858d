package quota

import (
	"cmp"
	"math"
	"slices"
	"sync"
	"time"
)

// maxBuckets bounds how many buckets the quota state remembers, so that a
// server naming ever new buckets cannot grow it without bound. A
// connectlimit server names only the buckets of its configuration.
const maxBuckets = 1024

// bucketState is what a tracker knows of one bucket.
type bucketState struct {
	quota Quota
	// pending counts the tokens of paced calls that were sent and whose
	// response has not been read: the last state does not show them yet.
	pending float64
}

// levelAt estimates the bucket's level at now from the last state: what
// it held, plus the refill since, minus the calls in flight. It reports
// false when the server has not said the bucket's shape.
func (b *bucketState) levelAt(now time.Time) (level, perSecond float64, ok bool) {
	q := b.quota
	if q.Capacity <= 0 || q.Window <= 0 {
		return 0, 0, false
	}
	capacity := float64(q.Capacity)
	perSecond = capacity / q.Window.Seconds()
	level = float64(q.Remaining)
	if elapsed := now.Sub(q.ObservedAt); elapsed > 0 {
		level += elapsed.Seconds() * perSecond
	}
	return math.Min(level, capacity) - b.pending, perSecond, true
}

// quotaState holds the last known state of every bucket and the
// subscribers to it. It is safe for concurrent use.
type quotaState struct {
	mu      sync.Mutex
	buckets map[string]*bucketState
	subs    []*subscriber
}

func newQuotaState() *quotaState {
	return &quotaState{buckets: map[string]*bucketState{}}
}

// observe records the RateLimit fields of h (a response's headers or an
// error's metadata), read at now, and hands the buckets it updated to the
// subscribers. It first settles reserved, the pacing reservation of the
// call h answers. An invalid line of a field is ignored (see parseLines);
// a response without the RateLimit field changes no bucket.
func (s *quotaState) observe(h Header, now time.Time, reserved []Cost) {
	state := parseLines(h.Values(HeaderRateLimit), "r", "t")
	policies := parseLines(h.Values(HeaderRateLimitPolicy), "q", "w")
	warned := parseLines(h.Values(HeaderWarning), "r", "q")
	s.mu.Lock()
	s.releaseLocked(reserved)
	var changed []Quota
	for _, item := range state {
		b := s.buckets[item.bucket]
		if b == nil {
			if len(s.buckets) >= maxBuckets {
				continue
			}
			b = &bucketState{quota: Quota{Bucket: item.bucket}}
			s.buckets[item.bucket] = b
		}
		q := &b.quota
		q.Remaining = item.params["r"]
		q.ResetAt = time.Time{}
		if t, ok := item.params["t"]; ok {
			q.ResetAt = now.Add(seconds(t))
		}
		q.Warning = slices.ContainsFunc(warned, func(w fieldItem) bool { return w.bucket == item.bucket })
		q.ObservedAt = now
		if i := slices.IndexFunc(policies, func(p fieldItem) bool { return p.bucket == item.bucket }); i >= 0 {
			q.Capacity = policies[i].params["q"]
			q.Window = 0
			if w, ok := policies[i].params["w"]; ok {
				q.Window = seconds(w)
			}
		}
		changed = append(changed, *q)
	}
	subs := s.enqueueLocked(changed)
	s.mu.Unlock()
	for _, sub := range subs {
		sub.drain()
	}
}

// seconds converts whole seconds from a header into a Duration,
// saturating instead of overflowing.
func seconds(n int64) time.Duration {
	if n > int64(math.MaxInt64/time.Second) {
		return math.MaxInt64
	}
	return time.Duration(n) * time.Second
}

// reserve is pacing's check: if, by the last known state, every bucket of
// costs can pay its tokens at now, it counts them as in flight and returns
// them (to give to observe with the call's response); otherwise it returns
// how long until they can. A bucket whose state or shape is unknown, or
// that can never pay (tokens over its capacity), has no say: the server
// decides.
func (s *quotaState) reserve(costs []Cost, now time.Time) (reserved []Cost, wait time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range costs {
		b := s.buckets[c.Bucket]
		if b == nil {
			continue
		}
		level, perSecond, ok := b.levelAt(now)
		if !ok || c.Tokens > float64(b.quota.Capacity) || level >= c.Tokens {
			continue
		}
		wait = max(wait, time.Duration(math.Ceil((c.Tokens-level)/perSecond*1e9)))
	}
	if wait > 0 {
		return nil, wait
	}
	for _, c := range costs {
		if b := s.buckets[c.Bucket]; b != nil {
			b.pending += c.Tokens
			reserved = append(reserved, c)
		}
	}
	return reserved, 0
}

// release settles a pacing reservation whose call ended without a
// response to observe.
func (s *quotaState) release(reserved []Cost) {
	if len(reserved) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releaseLocked(reserved)
}

func (s *quotaState) releaseLocked(reserved []Cost) {
	for _, c := range reserved {
		if b := s.buckets[c.Bucket]; b != nil {
			b.pending = math.Max(0, b.pending-c.Tokens)
		}
	}
}

// get returns the state of one bucket.
func (s *quotaState) get(name string) (Quota, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.buckets[name]; b != nil {
		return b.quota, true
	}
	return Quota{}, false
}

// all returns the state of every known bucket, by name.
func (s *quotaState) all() []Quota {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.allLocked()
}

func (s *quotaState) allLocked() []Quota {
	quotas := make([]Quota, 0, len(s.buckets))
	for _, b := range s.buckets {
		quotas = append(quotas, b.quota)
	}
	slices.SortFunc(quotas, func(a, b Quota) int { return cmp.Compare(a.Bucket, b.Bucket) })
	return quotas
}

// subscribe adds f, first handing it every known bucket.
func (s *quotaState) subscribe(f func(Quota)) func() {
	sub := &subscriber{f: f}
	s.mu.Lock()
	s.subs = append(s.subs, sub)
	sub.queue = s.allLocked()
	s.mu.Unlock()
	sub.drain()
	return sync.OnceFunc(func() {
		s.mu.Lock()
		s.subs = slices.DeleteFunc(s.subs, func(other *subscriber) bool { return other == sub })
		s.mu.Unlock()
		sub.mu.Lock()
		sub.removed, sub.queue = true, nil
		sub.mu.Unlock()
	})
}

// enqueueLocked queues changed for every subscriber, in the order the
// state changed (s.mu orders the changes), and returns the subscribers
// to drain once s.mu is released.
func (s *quotaState) enqueueLocked(changed []Quota) []*subscriber {
	if len(changed) == 0 || len(s.subs) == 0 {
		return nil
	}
	for _, sub := range s.subs {
		sub.mu.Lock()
		sub.queue = append(sub.queue, changed...)
		sub.mu.Unlock()
	}
	return slices.Clone(s.subs)
}

// subscriber delivers queued quotas to f one at a time, in order, on the
// goroutine of whichever call finds it idle. A call made from f (through
// the same tracker) queues its updates behind the one f is handling
// instead of deadlocking, and they are delivered once f returns.
type subscriber struct {
	f func(Quota)

	mu      sync.Mutex
	queue   []Quota
	running bool
	removed bool
}

func (sub *subscriber) drain() {
	sub.mu.Lock()
	if sub.running {
		sub.mu.Unlock()
		return
	}
	sub.running = true
	sub.mu.Unlock()
	finished := false
	defer func() {
		if !finished { // f panicked: let the next update find sub idle
			sub.mu.Lock()
			sub.running = false
			sub.mu.Unlock()
		}
	}()
	for {
		sub.mu.Lock()
		if len(sub.queue) == 0 || sub.removed {
			sub.running, finished = false, true
			sub.mu.Unlock()
			return
		}
		q := sub.queue[0]
		sub.queue = sub.queue[1:]
		sub.mu.Unlock()
		sub.f(q)
	}
}
