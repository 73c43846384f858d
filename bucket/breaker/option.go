package breaker

import "time"

// DefaultThreshold is how many consecutive failures open a [Breaker] unless
// set with [WithThreshold].
const DefaultThreshold = 5

// DefaultProbeInterval is how often an open [Breaker] probes its store
// unless set with [WithProbeInterval].
const DefaultProbeInterval = 250 * time.Millisecond

// Option configures a [Breaker].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	threshold int
	interval  time.Duration
	hook      func(State, error)
}

// WithThreshold sets how many consecutive failures open the Breaker; see
// the package documentation for what counts as one. The default is
// [DefaultThreshold]: 5. An n below 1 is raised to 1, which opens the
// Breaker on the first failure.
func WithThreshold(n int) Option {
	return optionFunc(func(c *config) { c.threshold = max(n, 1) })
}

// WithProbeInterval sets how often the Breaker probes its store while
// open, and how long each probe may take. The default is
// [DefaultProbeInterval]: 250ms, so that a store that comes back is used
// again within about a quarter of a second, at the cost of four cheap
// calls a second while it is down. Zero or a negative d keeps the default.
func WithProbeInterval(d time.Duration) Option {
	return optionFunc(func(c *config) {
		if d > 0 {
			c.interval = d
		}
	})
}

// WithStateHook sets a function the Breaker calls on every change of
// state: with [StateOpen] and the failure that opened it, and with
// [StateClosed] and that same failure when it closes again. Use it to log
// and to export metrics. The default is no hook; nil keeps the default.
//
// The hook is called from whichever goroutine caused the change (a call
// that failed, or the probe), one call at a time and in the order of the
// changes, so it must be safe to call from any goroutine.
// It runs under the Breaker's transition lock: it should return quickly,
// and it must not call the Breaker's Take, Acquire, Release or Close
// (State and Stats are fine).
func WithStateHook(f func(State, error)) Option {
	return optionFunc(func(c *config) { c.hook = f })
}
