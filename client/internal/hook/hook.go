// Package hook gives the tests of connectlimit's client packages what
// package quota's public API does not offer: a way to replace the clock and
// the jitter of a quota.Tracker. Package quota fills it in when it is
// initialized.
package hook

import (
	"context"
	"time"
)

// Clock is a tracker's time: what the present is, and how to wait.
type Clock interface {
	// Now returns the present.
	Now() time.Time
	// Sleep waits for d, or until ctx is done, when it returns ctx's
	// error.
	Sleep(ctx context.Context, d time.Duration) error
}

// WithClock returns a quota.Option (as any: this package cannot import
// quota) that sets a tracker's clock to c and its source of jitter to
// random, a function returning values in [0, 1); nil leaves either as it
// is. Package quota sets it in its init function.
var WithClock func(c Clock, random func() float64) any
