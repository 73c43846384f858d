package denycache_test

import (
	"context"
	"fmt"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/denycache"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

func ExampleNew() {
	// A fake clock, so that the output does not depend on the machine.
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clock := func() time.Time { return now }
	// memstore stands in for a remote store here (in production, wrap the
	// circuit breaker around a redisstore: an in-process store gains
	// nothing from the cache).
	store := memstore.New(memstore.WithClock(clock))
	defer store.Close()
	cache := denycache.New(store, denycache.WithClock(clock))

	req := bucket.Request{Subject: "user:mallory", Charges: []bucket.Charge{
		{Bucket: "search", Limit: bucket.Limit{Capacity: 2, RefillPerSecond: 1}, Cost: 1},
	}}
	take := func() {
		d, err := cache.Take(context.Background(), req)
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Printf("allowed %v, remaining %v, retry after %v\n", d.Allowed, d.Buckets[0].Remaining, d.RetryAfter)
	}
	for range 5 {
		take() // two allowed, one denied by the store, two denied locally
	}
	now = now.Add(time.Second)
	take() // one token is back: the store allows
	take() // denied locally again
	st := cache.Stats()
	fmt.Printf("%d store calls, %d denied by the store, %d denied locally\n", st.StoreCalls, st.StoreDenials, st.LocalDenials)
	// Output:
	// allowed true, remaining 1, retry after 0s
	// allowed true, remaining 0, retry after 0s
	// allowed false, remaining 0, retry after 1s
	// allowed false, remaining 0, retry after 1s
	// allowed false, remaining 0, retry after 1s
	// allowed true, remaining 0, retry after 0s
	// allowed false, remaining 0, retry after 1s
	// 4 store calls, 1 denied by the store, 3 denied locally
}
