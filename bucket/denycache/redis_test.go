package denycache_test

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/denycache"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// TestRedis checks, against a real Redis on the real clock, that a local
// denial matches what Redis answers and that a resend after a lost reply
// reaches Redis's own ID memory. The contract suite cannot run here: it
// drives a fake clock that only the store's tests can give redisstore.
func TestRedis(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	redis := redisstore.New(client, redisstore.WithTimeout(10*time.Second), redisstore.WithKeyPrefix("denycache"))
	spy := &spyStore{Store: redis}
	cache := denycache.New(spy)
	// A slow refill, so that the time between two calls on a loaded
	// machine changes the level by little.
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 0.01}
	req := func(id string, cost float64) bucket.Request {
		return bucket.Request{Subject: "user:mallory", ID: id, Charges: []bucket.Charge{{Bucket: "search", Limit: lim, Cost: cost}}}
	}
	take := func(r bucket.Request) bucket.Decision {
		t.Helper()
		d, err := cache.Take(t.Context(), r)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	take(req("drain", 10))
	if d := take(req("first", 3)); d.Allowed {
		t.Fatalf("Redis allowed 3 tokens of a drained bucket: %+v", d)
	}
	calls := spy.calls.Load()
	for i := range 100 {
		d := take(req(fmt.Sprint("local-", i), 3))
		if d.Allowed {
			t.Fatalf("call %d allowed", i)
		}
	}
	asked := time.Now()
	local := take(req("last", 3))
	if got := spy.calls.Load() - calls; got != 0 {
		t.Fatalf("%d of 101 denials reached Redis, want none", got)
	}
	want, err := redis.Take(t.Context(), req("last", 3))
	if err != nil {
		t.Fatal(err)
	}
	between := time.Since(asked)
	if want.Allowed || math.Abs(local.Buckets[0].Remaining-want.Buckets[0].Remaining) > 0.01 ||
		(local.RetryAfter-want.RetryAfter).Abs() > 100*time.Millisecond {
		t.Fatalf("local denial %+v, Redis's %+v", local, want)
	}
	// The cache measures refill from when it sent the call Redis denied,
	// so it never makes a caller wait longer than Redis would have at the
	// same instant.
	if local.RetryAfter > want.RetryAfter+between+time.Microsecond {
		t.Fatalf("local RetryAfter %v is longer than Redis's %v asked %v later", local.RetryAfter, want.RetryAfter, between)
	}

	// A take whose reply is lost was applied; its resend is Redis's
	// duplicate, though the cache knows the bucket cannot pay.
	take(bucket.Request{Subject: "user:mallory", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{{Bucket: "search", Limit: lim, Cost: -10}}})
	spy.setFail(fmt.Errorf("timeout: %w", bucket.ErrOutcomeUnknown))
	if _, err := cache.Take(t.Context(), req("lost", 10)); !bucket.MayHaveApplied(err) {
		t.Fatalf("lost reply: %v", err)
	}
	spy.setFail(nil)
	if d := take(req("after", 1)); d.Allowed {
		t.Fatalf("the lost take was not applied: %+v", d)
	}
	calls = spy.calls.Load()
	if d := take(req("lost", 10)); !d.Allowed || !d.Duplicate || spy.calls.Load() == calls {
		t.Fatalf("resend of the lost take: %+v, want Redis's duplicate", d)
	}
}
