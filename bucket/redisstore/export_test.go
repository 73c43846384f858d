package redisstore

import "time"

// WithClock exposes withClock to the black-box tests: the store then decides
// at now() instead of at the server's TIME. It exists only in test builds.
func WithClock(now func() time.Time) Option { return withClock(now) }

// Queued reports how many operations wait in s's queue, abandoned ones
// included, and how many batches are in flight, so that tests can line
// operations up behind a hung server in a known order.
func Queued(s *Store) (queued, inFlight int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue), s.inFlight
}

// KeySlot exposes keySlot to the black-box tests.
func KeySlot(key string) uint16 { return keySlot(key) }
