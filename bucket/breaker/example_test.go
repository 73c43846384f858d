package breaker_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/breaker"
)

// downStore is a store whose backend cannot be reached.
type downStore struct{}

func (downStore) Take(context.Context, bucket.Request) (bucket.Decision, error) {
	return bucket.Decision{}, fmt.Errorf("redis: dial tcp 10.0.0.7:7001: connection refused: %w", bucket.ErrNotApplied)
}

func ExampleNew() {
	b := breaker.New(downStore{},
		breaker.WithThreshold(2),
		breaker.WithStateHook(func(s breaker.State, err error) {
			// Log and count here; this runs on every change of state.
			fmt.Println("breaker is now", s)
		}),
	)
	defer b.Close() // stops the probe
	req := bucket.Request{Subject: "user:alice", Charges: []bucket.Charge{{Bucket: "search", Limit: bucket.Limit{Capacity: 10, RefillPerSecond: 1}, Cost: 1}}}
	for range 3 {
		_, err := b.Take(context.Background(), req)
		fmt.Println("unavailable:", errors.Is(err, bucket.ErrUnavailable), "may have applied:", bucket.MayHaveApplied(err))
	}
	fmt.Printf("%+v\n", b.Stats())
	// Output:
	// unavailable: false may have applied: false
	// breaker is now open
	// unavailable: false may have applied: false
	// unavailable: true may have applied: false
	// {Opens:1 Closes:0 Rejected:1 Failures:2}
}
