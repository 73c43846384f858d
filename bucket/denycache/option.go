package denycache

import "time"

// DefaultMaxEntries is how many entries a [Store] holds at most unless set
// with [WithMaxEntries]: 1<<16, about 65 thousand. An entry is one bucket of
// one subject that the wrapped store recently denied (or that a denied
// request named). Measured on amd64, it costs about 160 bytes of heap
// besides the subject and bucket strings it shares with the request that
// made it, so a full cache holds about 10 MiB. Entries live only until their bucket would be full
// again, so the cache reaches its bound only when that many buckets are
// denied within one refill period.
const DefaultMaxEntries = 1 << 16

// Option configures a [Store].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	now        func() time.Time
	maxEntries int
}

// WithClock sets the function the Store reads the present from, to predict
// how far a denied bucket has refilled. The default is [time.Now]. It need
// not agree with the wrapped store's clock (the Store measures only how
// much time passed since it sent a call, never compares its instants with
// the store's), but it must advance at the same rate. Tests pass a fake
// clock to see refill without sleeping. The function must be safe for
// concurrent use; nil keeps the default.
func WithClock(now func() time.Time) Option {
	return optionFunc(func(c *config) {
		if now != nil {
			c.now = now
		}
	})
}

// WithMaxEntries bounds how many entries the Store holds; the default is
// [DefaultMaxEntries]. The bound is split evenly across the Store's 64
// shards, each holding at most ⌈n/64⌉ entries, so [Stats.Entries] never
// exceeds n rounded up to a multiple of 64. An n below 64, including zero
// and negative values, is raised to 64: one entry per shard. There is no
// unbounded setting.
//
// When a denial would add an entry to a full shard, the Store drops an
// entry that has expired or, failing that, of a few it samples, the one
// whose bucket will be full soonest. Dropping an entry is always safe: the
// next request for that bucket goes to the wrapped store, which costs a
// round trip and never admits anything the store would not.
// [Stats.Evictions] counts them.
func WithMaxEntries(n int) Option {
	return optionFunc(func(c *config) { c.maxEntries = n })
}
