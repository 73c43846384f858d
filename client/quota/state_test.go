package quota

import (
	"net/http"
	"reflect"
	"strconv"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func header(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

// TestObserve walks the quota state through responses at fixed instants.
func TestObserve(t *testing.T) {
	t.Parallel()
	type step struct {
		at     time.Duration
		header http.Header
		want   []Quota
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"a unary response with policy and state", []step{{0, header(
			HeaderRateLimitPolicy, `"search";q=60;w=60, "all_ai_tokens";q=100000;w=86400`,
			HeaderRateLimit, `"search";r=59;t=1, "all_ai_tokens";r=99999;t=1`),
			[]Quota{
				{Bucket: "all_ai_tokens", Remaining: 99999, Capacity: 100000, Window: 24 * time.Hour, ResetAt: t0.Add(time.Second), ObservedAt: t0},
				{Bucket: "search", Remaining: 59, Capacity: 60, Window: time.Minute, ResetAt: t0.Add(time.Second), ObservedAt: t0},
			}}}},
		{"a warning, then none", []step{
			{0, header(HeaderRateLimitPolicy, `"t";q=10000;w=3600`, HeaderRateLimit, `"t";r=800;t=3312`, HeaderWarning, `"t";r=800;q=10000`),
				[]Quota{{Bucket: "t", Remaining: 800, Capacity: 10000, Window: time.Hour, ResetAt: t0.Add(3312 * time.Second), Warning: true, ObservedAt: t0}}},
			{time.Minute, header(HeaderRateLimit, `"t";r=2000;t=2880`),
				[]Quota{{Bucket: "t", Remaining: 2000, Capacity: 10000, Window: time.Hour, ResetAt: t0.Add(time.Minute + 2880*time.Second), ObservedAt: t0.Add(time.Minute)}}},
		}},
		{"the policy is kept when a response has none", []step{
			{0, header(HeaderRateLimitPolicy, `"s";q=3;w=3`, HeaderRateLimit, `"s";r=2;t=1`),
				[]Quota{{Bucket: "s", Remaining: 2, Capacity: 3, Window: 3 * time.Second, ResetAt: t0.Add(time.Second), ObservedAt: t0}}},
			{time.Second, header(HeaderRateLimit, `"s";r=0`),
				[]Quota{{Bucket: "s", Remaining: 0, Capacity: 3, Window: 3 * time.Second, ObservedAt: t0.Add(time.Second)}}},
		}},
		{"no RateLimit field: nothing changes", []step{
			{0, header(HeaderRateLimitPolicy, `"s";q=3;w=3`), nil},
			{0, header("Content-Type", "application/json"), nil},
		}},
		{"an invalid RateLimit field is ignored", []step{
			{0, header(HeaderRateLimit, `"s";r=2`), []Quota{{Bucket: "s", Remaining: 2, ObservedAt: t0}}},
			{time.Second, header(HeaderRateLimit, `"s";r=-1`), []Quota{{Bucket: "s", Remaining: 2, ObservedAt: t0}}},
			{time.Second, header(HeaderRateLimit, `"s";r=1, "s";r=0`), []Quota{{Bucket: "s", Remaining: 2, ObservedAt: t0}}},
		}},
		{"an invalid policy or warning is ignored, the state is not", []step{
			{0, header(HeaderRateLimitPolicy, `"s";q=1.5`, HeaderRateLimit, `"s";r=1`, HeaderWarning, `"s"`),
				[]Quota{{Bucket: "s", Remaining: 1, ObservedAt: t0}}},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newQuotaState()
			for i, st := range tc.steps {
				s.observe(st.header, t0.Add(st.at), nil)
				got := s.all()
				if len(got) == 0 && len(st.want) == 0 {
					continue
				}
				if !reflect.DeepEqual(got, st.want) {
					t.Fatalf("step %d: state\n%+v\nwant\n%+v", i, got, st.want)
				}
			}
		})
	}
}

// TestReserve walks pacing through steps at fixed instants: a bucket of 3
// tokens refilling at 1 a second (w=3).
func TestReserve(t *testing.T) {
	t.Parallel()
	type step struct {
		at       time.Duration
		observe  http.Header // if set, a response read at this instant
		release  bool        // observe settles the earliest reservation
		costs    []Cost
		wantWait time.Duration
	}
	search := func(n float64) []Cost { return []Cost{{Bucket: "s", Tokens: n}} }
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"unknown bucket: no say", []step{{costs: search(100)}}},
		{"calls in flight count", []step{
			{observe: header(HeaderRateLimitPolicy, `"s";q=3;w=3`, HeaderRateLimit, `"s";r=2`)},
			{costs: search(1)},
			{costs: search(1)},
			{costs: search(1), wantWait: time.Second},
			{at: 500 * time.Millisecond, costs: search(1), wantWait: 500 * time.Millisecond},
			{at: time.Second, costs: search(1)},
			{at: time.Second, costs: search(2), wantWait: 2 * time.Second},
		}},
		{"a response settles its reservation", []step{
			{observe: header(HeaderRateLimitPolicy, `"s";q=3;w=3`, HeaderRateLimit, `"s";r=1`)},
			{costs: search(1)},
			{costs: search(1), wantWait: time.Second},
			// The server charged it: r=0 includes it, and it is no longer
			// in flight.
			{at: 250 * time.Millisecond, observe: header(HeaderRateLimit, `"s";r=0`), release: true},
			{at: 250 * time.Millisecond, costs: search(1), wantWait: time.Second},
			{at: 1250 * time.Millisecond, costs: search(1)},
		}},
		{"refill stops at capacity", []step{
			{observe: header(HeaderRateLimitPolicy, `"s";q=3;w=3`, HeaderRateLimit, `"s";r=0`)},
			{at: time.Hour, costs: search(3)},
			{at: time.Hour, costs: search(1), wantWait: time.Second},
		}},
		{"over capacity: no say", []step{
			{observe: header(HeaderRateLimitPolicy, `"s";q=3;w=3`, HeaderRateLimit, `"s";r=0`)},
			{costs: search(4)},
		}},
		{"no policy: no say", []step{
			{observe: header(HeaderRateLimit, `"s";r=0`)},
			{costs: search(1)},
		}},
		{"the slowest bucket decides", []step{
			{observe: header(HeaderRateLimitPolicy, `"s";q=3;w=3, "t";q=100;w=10`, HeaderRateLimit, `"s";r=0, "t";r=0`)},
			{costs: []Cost{{Bucket: "s", Tokens: 1}, {Bucket: "t", Tokens: 50}}, wantWait: 5 * time.Second},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newQuotaState()
			var inFlight [][]Cost
			for i, st := range tc.steps {
				now := t0.Add(st.at)
				if st.observe != nil {
					var settle []Cost
					if st.release {
						settle, inFlight = inFlight[0], inFlight[1:]
					}
					s.observe(st.observe, now, settle)
				}
				if st.costs == nil {
					continue
				}
				reserved, wait := s.reserve(st.costs, now)
				if wait != st.wantWait {
					t.Fatalf("step %d: wait %v, want %v", i, wait, st.wantWait)
				}
				if wait == 0 {
					inFlight = append(inFlight, reserved)
				}
			}
		})
	}
}

// TestSubscribe checks the order of delivery, a call made from a
// subscriber, and unsubscribing.
func TestSubscribe(t *testing.T) {
	t.Parallel()
	s := newQuotaState()
	s.observe(header(HeaderRateLimit, `"b";r=1, "a";r=2`), t0, nil)
	var got []int64
	var unsubscribe func()
	unsubscribe = s.subscribe(func(q Quota) {
		got = append(got, q.Remaining)
		if q.Remaining == 3 {
			// A call made by the subscriber: its update is delivered
			// after this one, not in the middle of it.
			s.observe(header(HeaderRateLimit, `"a";r=4`), t0, nil)
			got = append(got, -1)
		}
		if q.Remaining == 4 {
			unsubscribe()
		}
	})
	s.observe(header(HeaderRateLimit, `"a";r=3`), t0, nil)
	s.observe(header(HeaderRateLimit, `"a";r=5`), t0, nil)
	// Known buckets first, by name (a=2, b=1); then 3, and 4 after 3's
	// callback returned; 5 comes after unsubscribing.
	if want := []int64{2, 1, 3, -1, 4}; !reflect.DeepEqual(got, want) {
		t.Fatalf("delivered %v, want %v", got, want)
	}
	unsubscribe() // harmless
}

// TestSubscribeConcurrent delivers updates from many goroutines to a
// subscriber that must never run twice at once, must get every update,
// and must get each bucket's last update last.
func TestSubscribeConcurrent(t *testing.T) {
	t.Parallel()
	s := newQuotaState()
	var running, overlaps, delivered int
	var mu sync.Mutex
	last := map[string]int64{}
	unsubscribe := s.subscribe(func(q Quota) {
		mu.Lock()
		running++
		if running > 1 {
			overlaps++
		}
		delivered++
		last[q.Bucket] = q.Remaining
		mu.Unlock()
		time.Sleep(10 * time.Microsecond)
		mu.Lock()
		running--
		mu.Unlock()
	})
	defer unsubscribe()
	const goroutines, updates = 8, 200
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range updates {
				r := strconv.Itoa(g*updates + i)
				s.observe(header(HeaderRateLimit, `"x";r=`+r+`, "y";r=`+r), t0, nil)
			}
		})
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if overlaps > 0 {
		t.Fatalf("the subscriber ran %d times while it was running", overlaps)
	}
	if delivered != goroutines*updates*2 {
		t.Fatalf("%d updates delivered, want %d", delivered, goroutines*updates*2)
	}
	for _, name := range []string{"x", "y"} {
		if q, _ := s.get(name); last[name] != q.Remaining {
			t.Fatalf("bucket %s: last delivered r=%d, but the state is r=%d", name, last[name], q.Remaining)
		}
	}
}
