package client

import "github.com/connectlimit/connectlimit/client/internal/clienttest"

// FakeClock is a manual clock for tests; see [clienttest.FakeClock].
type FakeClock = clienttest.FakeClock

// NewFakeClock returns a clock at start; auto makes Sleep return at once.
var NewFakeClock = clienttest.NewFakeClock

// WithClock and WithRandom let black-box tests drive time and jitter.
var (
	WithClock  = func(c *FakeClock) Option { return quotaOption(clienttest.Option(c, nil)) }
	WithRandom = func(f func() float64) Option { return quotaOption(clienttest.Option(nil, f)) }
)
