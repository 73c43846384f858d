package redisstore

import (
	"context"
	"slices"
	"time"

	"github.com/redis/go-redis/v9"
)

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

// GroupKey returns the key of the group hash that holds subject's buckets
// under prefix, with the default number of groups.
func GroupKey(prefix, subject string) string {
	return groupKey(escape(prefix), groupOf(escape(subject), DefaultGroups))
}

// Field returns the field of subject's bucket name in its group hash.
func Field(subject, name string) string { return field(escape(subject), escape(name)) }

// MarkerKey returns the marker key of subject's request ID id under
// prefix, with the default number of groups.
func MarkerKey(prefix, subject, id string) string {
	s := escape(subject)
	return idKey(escape(prefix), groupOf(s, DefaultGroups), s, escape(id))
}

// groupKey, idKey and field return what appendGroupKey, appendIDKey and
// appendField append.
func groupKey(prefix string, g uint64) string { return string(appendGroupKey(nil, prefix, g)) }

func idKey(prefix string, g uint64, subject, id string) string {
	return string(appendIDKey(nil, prefix, g, subject, id))
}

func field(subject, name string) string { return string(appendField(nil, subject, name)) }

// ExpiryField is the field of a group hash that holds its expiry instant
// (see batch.lua); it is no bucket.
const ExpiryField = ""

// BucketFields returns the fields of the group hash at key, in Redis's
// order, leaving out its expiry field: the buckets it holds.
func BucketFields(ctx context.Context, c redis.Cmdable, key string) ([]string, error) {
	fields, err := c.HKeys(ctx, key).Result()
	return slices.DeleteFunc(fields, func(f string) bool { return f == ExpiryField }), err
}
