package memstore_test

import (
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

func TestContract(t *testing.T) {
	t.Parallel()
	buckettest.Run(t, func(t *testing.T, clock *buckettest.Clock) bucket.Store {
		s := memstore.New(memstore.WithClock(clock.Now))
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

func TestLeaseContract(t *testing.T) {
	t.Parallel()
	buckettest.RunLeases(t, func(t *testing.T, clock *buckettest.Clock) bucket.LeaseStore {
		s := memstore.New(memstore.WithClock(clock.Now))
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

func TestFullBucketsHoldNoMemory(t *testing.T) {
	t.Parallel()
	clock := buckettest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	s := memstore.New(memstore.WithClock(clock.Now), memstore.WithSweepInterval(0))
	t.Cleanup(func() { _ = s.Close() })
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	for i := range 1000 {
		req := bucket.Request{Subject: string(rune('a'+i%26)) + time.Duration(i).String(), Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: float64(1 + i%10)}}}
		if _, err := s.Take(t.Context(), req); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.Len(); got != 1000 {
		t.Fatalf("Len = %d after 1000 takes, want 1000", got)
	}
	clock.Advance(5 * time.Second)
	s.Sweep()
	// Buckets charged 1..5 are full after 5 s; those charged 6..10 are not.
	if got := s.Len(); got != 500 {
		t.Fatalf("Len = %d after 5 s and a sweep, want 500", got)
	}
	clock.Advance(5 * time.Second)
	s.Sweep()
	if got := s.Len(); got != 0 {
		t.Fatalf("Len = %d after 10 s and a sweep, want 0", got)
	}
	// A refund that fills a bucket deletes it at once.
	req := bucket.Request{Subject: "z", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 3}}}
	if _, err := s.Take(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	req.Mode, req.Charges[0].Cost = bucket.ModeAdjust, -3
	if _, err := s.Take(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	if got := s.Len(); got != 0 {
		t.Fatalf("Len = %d after a full refund, want 0", got)
	}
}

func TestBackgroundSweep(t *testing.T) {
	t.Parallel()
	clock := buckettest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	s := memstore.New(memstore.WithClock(clock.Now), memstore.WithSweepInterval(time.Millisecond))
	t.Cleanup(func() { _ = s.Close() })
	req := bucket.Request{Subject: "a", Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 1, RefillPerSecond: 1}, Cost: 1}}}
	if _, err := s.Take(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for s.Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("background sweep did not delete a full bucket within 10s")
		}
		time.Sleep(time.Millisecond)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
