// Package clienttest holds what the tests of connectlimit's client packages
// share: a manual clock (package fakeclock) for a quota.Tracker, set
// through package hook.
package clienttest

import (
	"time"

	"github.com/connectlimit/connectlimit/client/internal/hook"
	"github.com/connectlimit/connectlimit/client/quota"
	"github.com/connectlimit/connectlimit/internal/fakeclock"
)

// Option returns the quota option that gives a tracker the clock c and the
// source of jitter random (values in [0, 1)); a nil c or random leaves the
// tracker's own.
func Option(c *FakeClock, random func() float64) quota.Option {
	var clock hook.Clock
	if c != nil {
		clock = c
	}
	return hook.WithClock(clock, random).(quota.Option) //nolint:forcetypeassert // quota sets the hook
}

// FakeClock is the manual clock of package fakeclock.
type FakeClock = fakeclock.Clock

// NewFakeClock returns a clock at start; auto makes Sleep return at once.
func NewFakeClock(start time.Time, auto bool) *FakeClock { return fakeclock.New(start, auto) }
