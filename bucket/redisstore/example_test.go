package redisstore_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
)

// This example is compiled but not run: it needs a Redis at $REDIS_ADDR.
func ExampleNew() {
	client := redis.NewClient(&redis.Options{
		Addr: os.Getenv("REDIS_ADDR"), // host:port of your Redis
		// End a batch's socket read at the store's deadline, even if Redis
		// hangs.
		ContextTimeoutEnabled: true,
		// Never resend a script whose reply was lost: charge at most once,
		// and keep "not applied" and "unknown" apart.
		MaxRetries: -1,
		// Report a refused connection at once, as not applied.
		DialerRetries: 1,
	})
	defer client.Close()
	// Concurrent calls share script calls; each batch waits at most 50 ms.
	store := redisstore.New(client, redisstore.WithKeyPrefix("myapp"), redisstore.WithTimeout(50*time.Millisecond))

	// 60 requests a minute, in bursts of up to 10, plus 1,000 tokens a minute.
	d, err := store.Take(context.Background(), bucket.Request{
		Subject: "user:alice",
		Charges: []bucket.Charge{
			{Bucket: "requests", Limit: bucket.Limit{Capacity: 10, RefillPerSecond: 1}, Cost: 1},
			{Bucket: "tokens", Limit: bucket.Limit{Capacity: 1000, RefillPerSecond: 1000.0 / 60}, Cost: 250},
		},
	})
	switch {
	case bucket.MayHaveApplied(err):
		fmt.Println("Redis failed, maybe after charging; resend with an ID to know:", err)
	case err != nil:
		fmt.Println("Redis failed without charging:", err)
	case !d.Allowed:
		fmt.Println("denied; retry after", d.RetryAfter)
	default:
		fmt.Println("allowed;", d.Buckets[1].Remaining, "tokens left")
	}
}
