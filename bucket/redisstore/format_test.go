package redisstore_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// TestStoredLevelsRoundDown checks the rounding of the storage format (see
// the package doc): a bucket's level, stored and read back, is never above
// the level written by more than float64 rounding, and below it by less
// than one microsecond of refill; levels that are whole microseconds of
// refill come back exactly, and refill adds exactly to them.
func TestStoredLevelsRoundDown(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	clock := buckettest.NewClock(time.Date(2026, 11, 23, 16, 0, 0, 0, time.UTC))
	s := newStore(client, redisstore.WithKeyPrefix("round"), redisstore.WithClock(clock.Now))
	n := 0
	// write charges cost from a fresh bucket of lim in mode, then reads it
	// back after advancing the clock by wait, and returns the level written,
	// the level read and the refill in between: the store's clock counts
	// whole microseconds, so the refill is over the microseconds the clock
	// crossed.
	write := func(lim bucket.Limit, mode bucket.Mode, cost float64, wait time.Duration) (written, read, refill float64) {
		t.Helper()
		n++
		req := bucket.Request{Subject: fmt.Sprint("user:", n), Mode: mode, Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: cost}}}
		began := clock.Now().UnixMicro()
		d := take(t, s, req)
		if !d.Allowed {
			t.Fatalf("%+v: denied", req)
		}
		clock.Advance(wait)
		refill = float64(clock.Now().UnixMicro()-began) / 1e6 * lim.RefillPerSecond
		req.Mode, req.Charges[0].Cost = bucket.ModeTake, 0
		return d.Buckets[0].Remaining, take(t, s, req).Buckets[0].Remaining, refill
	}

	t.Run("Exact", func(t *testing.T) {
		for _, tc := range []struct {
			lim  bucket.Limit
			mode bucket.Mode
			cost float64
			wait time.Duration
			want float64
		}{
			{lim: bucket.Limit{Capacity: 10, RefillPerSecond: 1}, cost: 3, want: 7},
			{lim: bucket.Limit{Capacity: 10, RefillPerSecond: 1}, cost: 3, wait: 1500 * time.Millisecond, want: 8.5},
			{lim: bucket.Limit{Capacity: 1e12, RefillPerSecond: 1e6}, cost: 1, want: 1e12 - 1},
			{lim: bucket.Limit{Capacity: 1e12, RefillPerSecond: 1e6}, cost: 1e6 + 1, wait: time.Microsecond, want: 1e12 - 1e6},
			// 679e12 µs of refill: below 2^53, so still exact.
			{lim: bucket.Limit{Capacity: 5000, RefillPerSecond: 1e-6}, cost: 4321, want: 679},
			{lim: bucket.Limit{Capacity: 1, RefillPerSecond: 0.5}, cost: 0.25, want: 0.75},
			{lim: bucket.Limit{Capacity: 1, RefillPerSecond: 1000}, cost: 1, wait: 250 * time.Microsecond, want: 0.25},
			{lim: bucket.Limit{Capacity: 10, RefillPerSecond: 2}, mode: bucket.ModeAdjust, cost: 14, want: -4},
			{lim: bucket.Limit{Capacity: 10, RefillPerSecond: 2}, mode: bucket.ModeAdjust, cost: 14, wait: 3 * time.Second, want: 2},
			{lim: bucket.Limit{Capacity: 1e15, RefillPerSecond: 1e15}, mode: bucket.ModeAdjust, cost: 1e15, want: 0},
		} {
			if _, got, _ := write(tc.lim, tc.mode, tc.cost, tc.wait); got != tc.want {
				t.Errorf("%v %v from a full %+v, read %v later: %v, want exactly %v", tc.mode, tc.cost, tc.lim, tc.wait, got, tc.want)
			}
		}
	})

	t.Run("Bounded", func(t *testing.T) {
		// Capacities from 1 to 1e12, rates from 1e-6 to 1e9 tokens per
		// second, levels from a debt of two capacities to full, waits up to
		// 2 s on odd nanoseconds.
		rng := rand.New(rand.NewPCG(9, 4))
		for range 400 {
			lim := bucket.Limit{
				Capacity:        math.Pow(10, rng.Float64()*12),
				RefillPerSecond: math.Pow(10, -6+rng.Float64()*15),
			}
			mode, cost := bucket.ModeTake, lim.Capacity*rng.Float64()
			if rng.IntN(3) == 0 {
				// A debt of up to two capacities.
				mode, cost = bucket.ModeAdjust, lim.Capacity*(1+2*rng.Float64())
			}
			wait := time.Duration(rng.IntN(3)) * time.Duration(rng.Int64N(int64(time.Second)))
			written, got, refill := write(lim, mode, cost, wait)
			exact := math.Min(written+refill, lim.Capacity)
			noise := 1e-15 * (math.Abs(written) + refill)
			lowest := exact - lim.RefillPerSecond*1e-6 - noise
			if got > exact+noise || got < lowest {
				t.Errorf("%v %v from a full %+v, read %v later: %v, want from %v to %v", mode, cost, lim, wait, got, lowest, exact)
			}
		}
	})

	t.Run("BeyondFloat64", func(t *testing.T) {
		// Rates so slow that a level in microseconds of refill overflows
		// a float64: the stored level is lower, never higher.
		lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1e-305}
		if written, got, _ := write(lim, bucket.ModeTake, 1, 0); got > written || got < 0 {
			t.Errorf("take 1 from a full %+v: read %v, want from 0 to %v", lim, got, written)
		}
		if _, got, _ := write(lim, bucket.ModeAdjust, 1e15, 0); !math.IsInf(got, -1) {
			t.Errorf("adjust 1e15 from a full %+v: read %v, want -Inf", lim, got)
		}
		// The bucket stays readable, and in debt.
		d := take(t, s, bucket.Request{Subject: fmt.Sprint("user:", n), Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 1}}})
		if d.Allowed {
			t.Errorf("take from a bucket in unbounded debt: %+v, want denied", d)
		}
	})
}

// TestHashTTLIsTheLatest checks the TTL of a subject's group hash on the
// server's clock: the time until its last bucket is full, which a charge
// of a bucket that fills sooner never lowers.
func TestHashTTLIsTheLatest(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	s := newStore(client, redisstore.WithKeyPrefix("ttl"))
	key := redisstore.GroupKey("ttl", "user:alice")
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	pttl := func() time.Duration {
		t.Helper()
		d, err := client.PTTL(t.Context(), key).Result()
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	steps := []struct {
		costs   [2]float64 // of buckets a and b
		mode    bucket.Mode
		wantTTL time.Duration
	}{
		{costs: [2]float64{5, 1}, wantTTL: 5 * time.Second},
		// b would be full 2 s from now: a still needs 5.
		{costs: [2]float64{0, 1}, wantTTL: 5 * time.Second},
		// Refunded to full, a leaves the hash; its TTL stays.
		{costs: [2]float64{-10, 0}, mode: bucket.ModeAdjust, wantTTL: 5 * time.Second},
		{costs: [2]float64{0, 6}, wantTTL: 8 * time.Second},
	}
	for i, st := range steps {
		take(t, s, bucket.Request{Subject: "user:alice", Mode: st.mode, Charges: []bucket.Charge{
			{Bucket: "a", Limit: lim, Cost: st.costs[0]},
			{Bucket: "b", Limit: lim, Cost: st.costs[1]},
		}})
		// Rounded up to the millisecond and one more, less the time
		// since: the refill during the test is negligible.
		if got := pttl(); got > st.wantTTL+2*time.Millisecond || got < st.wantTTL-500*time.Millisecond {
			t.Fatalf("step %d: PTTL %s = %v, want about %v", i, key, got, st.wantTTL)
		}
	}
}
