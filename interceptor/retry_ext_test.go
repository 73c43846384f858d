package interceptor_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/interceptor"
)

// flakyStore fails the first failures settlements (ModeAdjust requests). A
// lost reply applies the request before failing, like a Redis whose reply
// never arrived.
type flakyStore struct {
	*memstore.Store
	failures  atomic.Int64
	lostReply bool
	always    bool
}

func (s *flakyStore) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	if req.Mode == bucket.ModeAdjust && (s.always || s.failures.Add(-1) >= 0) {
		if s.lostReply {
			_, _ = s.Store.Take(ctx, req)
		}
		return bucket.Decision{}, errors.New("connection reset")
	}
	return s.Store.Take(ctx, req)
}

func TestSettleRetries(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		failures    int64
		lostReply   bool
		always      bool
		wantRetried uint64
		wantDropped uint64
		wantCharged float64
	}{
		{"retried until applied", 3, false, false, 1, 0, 30},
		{"a lost reply is not applied twice", 2, true, false, 1, 0, 30},
		{"dropped when retries run out", 0, false, true, 1, 1, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := &flakyStore{Store: memstore.New(), lostReply: tc.lostReply, always: tc.always}
			t.Cleanup(func() { _ = store.Close() })
			store.failures.Store(tc.failures)
			f := newAIFixture(t, aiConfig(), store, interceptor.WithSettleQueue(4, 300*time.Millisecond))
			if _, err := f.ask.CallUnary(t.Context(), f.request("use=30", 100)); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the settlement is applied or dropped", func() bool {
				s := f.ic.Stats()
				_, tokens := f.levels(t, "ip:127.0.0.1")
				return s.SettlesRetried == tc.wantRetried && s.SettlesDropped == tc.wantDropped && near(1000-tokens, tc.wantCharged)
			})
			if err := f.ic.Close(t.Context()); err != nil {
				t.Fatal(err)
			}
			if _, tokens := f.levels(t, "ip:127.0.0.1"); !near(1000-tokens, tc.wantCharged) {
				t.Fatalf("charged %v after Close, want %v", 1000-tokens, tc.wantCharged)
			}
		})
	}
}

func TestSettleQueueFull(t *testing.T) {
	t.Parallel()
	store := &flakyStore{Store: memstore.New(), always: true}
	t.Cleanup(func() { _ = store.Close() })
	f := newAIFixture(t, aiConfig(), store, interceptor.WithSettleQueue(1, time.Hour))
	for range 5 {
		if _, err := f.ask.CallUnary(t.Context(), f.request("use=1", 10)); err != nil {
			t.Fatal(err)
		}
	}
	// One settlement is retried at a time and one waits; the other three
	// find the queue full and are dropped at once.
	eventually(t, "the overflow is dropped", func() bool { return f.ic.Stats().SettlesDropped >= 3 })
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := f.ic.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if s := f.ic.Stats(); s.SettlesDropped+s.SettlesRetried < 5 || s.SettlesDropped != 5 {
		t.Fatalf("stats %+v: want all 5 settlements dropped and accounted for", s)
	}
}
