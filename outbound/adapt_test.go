package outbound

import (
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// TestAdaptation walks the AIMD state through steps at fixed instants.
func TestAdaptation(t *testing.T) {
	t.Parallel()
	c := aimd{backoff: 0.5, minShare: 0.1, recovery: 0.05, pause: time.Second, maxPause: time.Minute}
	limited := func(pause time.Duration) *signal { return &signal{limited: true, pause: pause} }
	pause := func(d time.Duration) *signal { return &signal{pause: d} }
	type step struct {
		at    time.Duration
		epoch uint64  // of the permit that reports
		sig   *signal // nil: only check
		// want
		cut       bool
		share     float64
		pausedFor time.Duration // pausedUntil - t0
	}
	s := time.Second
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"at first, the whole rate", []step{{at: 0, share: 1}, {at: time.Hour, share: 1}}},
		{"a call that went well changes nothing", []step{{sig: &signal{}, share: 1}}},
		{"a refusal halves and pauses; the share recovers after the pause", []step{
			{sig: limited(2 * s), cut: true, share: 0.5, pausedFor: 2 * s},
			{at: 2 * s, share: 0.5, pausedFor: 2 * s},
			{at: 4 * s, share: 0.6, pausedFor: 2 * s},
			{at: 12 * s, share: 1, pausedFor: 2 * s},
			{at: time.Hour, share: 1, pausedFor: 2 * s},
		}},
		{"one cut per round of calls", []step{
			{sig: limited(0), cut: true, share: 0.5, pausedFor: s},
			// Granted before the cut: no second cut, but counted.
			{at: 100 * time.Millisecond, epoch: 0, sig: limited(0), share: 0.5, pausedFor: 1100 * time.Millisecond},
			// Granted after it: a new cut, of the share recovered since
			// the pause (0.9s at 5% a second).
			{at: 2 * s, epoch: 1, sig: limited(0), cut: true, share: 0.5 * 0.545, pausedFor: 3 * s},
		}},
		{"the share never drops below the floor", []step{
			{epoch: 0, sig: limited(0), cut: true, share: 0.5, pausedFor: s},
			{epoch: 1, sig: limited(0), cut: true, share: 0.25, pausedFor: s},
			{epoch: 2, sig: limited(0), cut: true, share: 0.125, pausedFor: s},
			{epoch: 3, sig: limited(0), cut: true, share: 0.1, pausedFor: s},
			{epoch: 4, sig: limited(0), cut: true, share: 0.1, pausedFor: s},
		}},
		{"a pause is at most the max pause", []step{{sig: limited(time.Hour), cut: true, share: 0.5, pausedFor: time.Minute}}},
		{"a shorter pause does not shorten a longer one", []step{
			{sig: pause(10 * s), share: 1, pausedFor: 10 * s},
			{at: s, sig: pause(2 * s), share: 1, pausedFor: 10 * s},
		}},
		{"an exhausted count pauses without a cut", []step{{sig: pause(3 * s), share: 1, pausedFor: 3 * s}}},
		{"a pause during recovery holds the share", []step{
			{sig: limited(s), cut: true, share: 0.5, pausedFor: s},
			{at: 5 * s, share: 0.7, pausedFor: s},
			{at: 5 * s, sig: pause(2 * s), share: 0.7, pausedFor: 7 * s},
			{at: 6 * s, share: 0.7, pausedFor: 7 * s},
			{at: 9 * s, share: 0.8, pausedFor: 7 * s},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var a adaptation
			for i, st := range tc.steps {
				now := t0.Add(st.at)
				if st.sig != nil {
					if cut := a.observe(now, st.epoch, *st.sig, c); cut != st.cut {
						t.Fatalf("step %d: cut %v, want %v", i, cut, st.cut)
					}
				}
				if got := a.shareAt(now, c); got < st.share-1e-9 || got > st.share+1e-9 {
					t.Fatalf("step %d: share %v, want %v", i, got, st.share)
				}
				if got := a.pausedUntil.Sub(t0); st.pausedFor > 0 && got != st.pausedFor || st.pausedFor == 0 && !a.pausedUntil.IsZero() {
					t.Fatalf("step %d: paused for %v after t0, want %v", i, got, st.pausedFor)
				}
			}
		})
	}
}

// TestDrain: a drain asked for at one instant is carried out later down to
// what the upstream had left plus what it refilled since; the latest word
// wins, and a drain is carried out once.
func TestDrain(t *testing.T) {
	t.Parallel()
	c := aimd{backoff: 0.5, minShare: 0.1, recovery: 0.05, pause: time.Second, maxPause: time.Minute}
	var a adaptation
	if _, ok := a.takeDrain(t0, 10); ok {
		t.Fatal("a drain before any was asked for")
	}
	a.observe(t0, 0, signal{limited: true, drain: true, drainTo: 42}, c)
	a.observe(t0.Add(time.Second), 1, signal{drain: true, drainTo: 7}, c)
	if to, ok := a.takeDrain(t0.Add(3*time.Second), 10); !ok || to != 27 {
		t.Fatalf("drain to %v, %v; want 7 + 2s × 10 = 27", to, ok)
	}
	if _, ok := a.takeDrain(t0.Add(3*time.Second), 10); ok {
		t.Fatal("a drain carried out twice")
	}
}
