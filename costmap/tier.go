package costmap

import (
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// Tier names used when an identity does not name one.
const (
	// AnonymousTier is the tier of callers known only by their address.
	AnonymousTier = "anonymous"
	// DefaultTierName is the name reported for the limits of
	// [Config.Buckets] when no tier applies.
	DefaultTierName = "default"
)

// Tier is the set of limits that applies to one tier of callers. It is
// immutable.
type Tier struct {
	// Name is the tier's name, or [DefaultTierName].
	Name string
	// key is the tier's key in Config.Tiers, "" for the default limits.
	key         string
	limits      map[string]bucket.Limit
	concurrency map[string]Concurrency
}

// Concurrency is a concurrency limit as it applies to one tier.
type Concurrency struct {
	// Name is the limit's name in the configuration.
	Name string
	// Limit is how many calls may run at once per identity.
	Limit int
	// Lease is how long a slot stays taken without renewal.
	Lease time.Duration
}

// Limit returns the limit of a bucket in this tier.
func (t *Tier) Limit(bucketName string) (bucket.Limit, bool) {
	l, ok := t.limits[bucketName]
	return l, ok
}

// Buckets returns the names of every bucket, sorted.
func (t *Tier) Buckets() []string { return sortedKeys(t.limits) }

// Concurrency returns a concurrency limit of this tier.
func (t *Tier) Concurrency(name string) (Concurrency, bool) {
	c, ok := t.concurrency[name]
	return c, ok
}

// ConcurrencyLimits returns the names of every concurrency limit, sorted.
func (t *Tier) ConcurrencyLimits() []string { return sortedKeys(t.concurrency) }
