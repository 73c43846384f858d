package outbound_test

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/outbound"
)

// complete stands for a call to an LLM provider that allows fewer tokens
// than we expected: it refuses the third call, asking for a pause of
// 200ms.
func complete(call int) outbound.Feedback {
	if call == 3 {
		return outbound.Feedback{Limited: true, RetryAfter: 200 * time.Millisecond}
	}
	return outbound.Feedback{}
}

func ExampleNew() {
	store := memstore.New() // or redisstore.New(redisClient), shared by every instance
	defer store.Close()
	// We expect the provider to allow 200 tokens a second, 400 at once.
	lim, err := outbound.New(store, "llm", bucket.Limit{Capacity: 400, RefillPerSecond: 200},
		outbound.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		fmt.Println(err)
		return
	}
	for call := 1; call <= 4; call++ {
		// Each call costs its prompt and the most it may write: 100
		// tokens. Wait blocks until the bucket can pay (and, after the
		// refusal, until the pause ends).
		permit, err := lim.Wait(context.Background(), 100)
		if err != nil {
			fmt.Println(err) // the context ended, or the store failed
			return
		}
		permit.Done(complete(call))
		s := lim.Stats()
		fmt.Printf("call %d: share of the rate %.1f, paused: %v\n", call, s.Share, time.Until(s.PausedUntil) > 0)
	}
	// Output:
	// call 1: share of the rate 1.0, paused: false
	// call 2: share of the rate 1.0, paused: false
	// call 3: share of the rate 0.5, paused: true
	// call 4: share of the rate 0.5, paused: false
}
