package outbound

import (
	"time"

	"github.com/connectlimit/connectlimit/internal/fakeclock"
)

// WithClock lets black-box tests drive time.
var WithClock = func(c *FakeClock) Option { return withClock(c) }

// FakeClock is the manual clock of package fakeclock.
type FakeClock = fakeclock.Clock

// NewFakeClock returns a clock at start; auto makes Sleep return at once.
func NewFakeClock(start time.Time, auto bool) *FakeClock { return fakeclock.New(start, auto) }
