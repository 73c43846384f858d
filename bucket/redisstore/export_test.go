package redisstore

import "time"

// WithClock exposes withClock to the black-box tests: the store then decides
// at now() instead of at the server's TIME. It exists only in test builds.
func WithClock(now func() time.Time) Option { return withClock(now) }
