package outbound

import (
	"math"
	"time"
)

// adaptation is the limiter's AIMD state: the share of the configured
// rate it allows, and until when it holds calls. It is a pure function of
// the instants it is given and never reads a clock. The zero value allows
// the whole rate.
//
// The share is share0 until since, then grows by recovery a second, up to
// 1. A refusal multiplies the share by backoff (not below minShare) at
// most once per epoch: calls granted before a cut were sent at the old rate,
// and their refusals say nothing new about the new one. A pause holds new
// calls until its end; the share does not grow during it, since no call
// tests it. A refusal, or a count of 0 tokens left, also asks the next
// waiter to drain the limiter's bucket down to what the upstream has left.
type adaptation struct {
	share0      float64 // share at since; 0 means 1, the zero value's
	since       time.Time
	pausedUntil time.Time
	// drain asks for the bucket to be brought down to drainTo tokens as
	// of drainAt (plus what the upstream refilled since).
	drain   bool
	drainTo float64
	drainAt time.Time
	// epoch counts the cuts; a permit remembers the epoch it was granted
	// in.
	epoch     uint64
	pushbacks int64
	slowdowns int64
}

// aimd is the adaptation's configuration.
type aimd struct {
	backoff, minShare, recovery float64
	pause, maxPause             time.Duration
}

// shareAt returns the share of the configured rate allowed at now.
func (a *adaptation) shareAt(now time.Time, c aimd) float64 {
	if a.share0 == 0 || a.share0 >= 1 {
		return 1
	}
	if !now.After(a.since) {
		return a.share0
	}
	return math.Min(1, a.share0+c.recovery*now.Sub(a.since).Seconds())
}

// signal is what the upstream said about one call.
type signal struct {
	// limited: it refused the call for its rate.
	limited bool
	// pause: how long it asked to hold calls; zero if it did not say.
	pause time.Duration
	// drain: it has at most drainTo tokens left (0 unless it said more).
	drain   bool
	drainTo float64
}

// observe applies what the upstream said at now about a call granted in
// epoch, and reports whether it cut the share.
func (a *adaptation) observe(now time.Time, epoch uint64, s signal, c aimd) (cut bool) {
	if s.drain { // the latest word wins
		a.drain, a.drainTo, a.drainAt = true, s.drainTo, now
	}
	if !s.limited && s.pause <= 0 {
		return false
	}
	share := a.shareAt(now, c)
	pause := s.pause
	if s.limited {
		a.pushbacks++
		if epoch == a.epoch {
			share = math.Max(share*c.backoff, c.minShare)
			a.epoch++
			a.slowdowns++
			cut = true
		}
		if pause <= 0 {
			pause = c.pause
		}
	}
	if end := now.Add(min(pause, c.maxPause)); end.After(a.pausedUntil) {
		a.pausedUntil = end
	}
	a.share0 = share
	a.since = now
	if a.pausedUntil.After(now) {
		a.since = a.pausedUntil
	}
	return cut
}

// takeDrain returns the pending drain, if any, and clears it: the level
// to bring the bucket down to at now, which is what the upstream said it
// had left plus what it refilled since, at perSecond.
func (a *adaptation) takeDrain(now time.Time, perSecond float64) (to float64, ok bool) {
	if !a.drain {
		return 0, false
	}
	to = a.drainTo
	if elapsed := now.Sub(a.drainAt); elapsed > 0 {
		to += elapsed.Seconds() * perSecond
	}
	a.drain, a.drainTo, a.drainAt = false, 0, time.Time{}
	return to, true
}
