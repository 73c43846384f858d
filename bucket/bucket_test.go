package bucket_test

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

func TestNewLimit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		capacity, rate float64
		wantErr        string // empty: valid
	}{
		{10, 1, ""},
		{0.5, 1e-9, ""},
		{0, 1, "capacity must be greater than 0 and at most 1e+15, got 0"},
		{-1, 1, "capacity must be greater than 0 and at most 1e+15, got -1"},
		{math.NaN(), 1, "capacity must be greater than 0 and at most 1e+15, got NaN"},
		{math.Inf(1), 1, "capacity must be greater than 0 and at most 1e+15, got +Inf"},
		{1, 0, "refill_per_second must be greater than 0 and at most 1e+15, got 0"},
		{1, -2, "refill_per_second must be greater than 0 and at most 1e+15, got -2"},
		{1, math.NaN(), "refill_per_second must be greater than 0 and at most 1e+15, got NaN"},
		{1, math.Inf(-1), "refill_per_second must be greater than 0 and at most 1e+15, got -Inf"},
		{1e15, 1e15, ""},
		{1e20, 1, "capacity must be greater than 0 and at most 1e+15, got 1e+20"},
		{1, 2e15, "refill_per_second must be greater than 0 and at most 1e+15, got 2e+15"},
	} {
		t.Run(fmt.Sprint(tc.capacity, "/", tc.rate), func(t *testing.T) {
			t.Parallel()
			l, err := bucket.NewLimit(tc.capacity, tc.rate)
			if tc.wantErr == "" {
				if err != nil || l.Capacity != tc.capacity || l.RefillPerSecond != tc.rate {
					t.Fatalf("NewLimit = %+v, %v", l, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestRefillAndTimeToFull(t *testing.T) {
	t.Parallel()
	l := bucket.Limit{Capacity: 10, RefillPerSecond: 4}
	for _, tc := range []struct {
		tokens   float64
		elapsed  time.Duration
		want     float64
		wantFull time.Duration
	}{
		{0, 0, 0, 2500 * time.Millisecond},
		{0, 250 * time.Microsecond, 0.001, 2499750 * time.Microsecond},
		{6, time.Second, 10, 0},
		{6, time.Hour, 10, 0},
		{-2, time.Second, 2, 2 * time.Second},
		{5, -time.Second, 5, 1250 * time.Millisecond}, // a clock that stepped back
	} {
		got := l.Refill(tc.tokens, tc.elapsed)
		if math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("Refill(%v, %v) = %v, want %v", tc.tokens, tc.elapsed, got, tc.want)
		}
		if full := l.TimeToFull(got); full != tc.wantFull {
			t.Errorf("TimeToFull(%v) = %v, want %v", got, full, tc.wantFull)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	t.Parallel()
	l := bucket.Limit{Capacity: 10, RefillPerSecond: 4}
	for _, tc := range []struct {
		tokens, cost float64
		want         time.Duration
	}{
		{10, 3, 0},
		{3, 3, 0},
		{2, 3, 250 * time.Millisecond},
		{-2, 3, 1250 * time.Millisecond},
		{0, 1e-9, 1},              // rounded up to the nanosecond
		{-1e30, 1, math.MaxInt64}, // beyond the Duration range: the longest one
	} {
		got := l.RetryAfter(tc.tokens, tc.cost)
		if got != tc.want {
			t.Errorf("RetryAfter(%v, %v) = %v, want %v", tc.tokens, tc.cost, got, tc.want)
		}
		// Waiting that long is enough, and a nanosecond less is not.
		if tc.want > 0 && tc.want < time.Hour {
			if lv := l.Refill(tc.tokens, got); lv < tc.cost {
				t.Errorf("RetryAfter(%v, %v) = %v: refills to only %v", tc.tokens, tc.cost, got, lv)
			}
			if lv := l.Refill(tc.tokens, got-1); lv >= tc.cost {
				t.Errorf("RetryAfter(%v, %v) = %v: a nanosecond less refills to %v already", tc.tokens, tc.cost, got, lv)
			}
		}
	}
}

func TestDecide(t *testing.T) {
	t.Parallel()
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	for _, tc := range []struct {
		name          string
		mode          bucket.Mode
		cost          []float64
		tokens        []float64
		wantAllowed   bool
		wantRemaining []float64
		wantRetry     time.Duration
	}{
		{"fits", bucket.ModeTake, []float64{4}, []float64{10}, true, []float64{6}, 0},
		{"exactly empties", bucket.ModeTake, []float64{10}, []float64{10}, true, []float64{0}, 0},
		{"float noise is tolerated", bucket.ModeTake, []float64{0.3}, []float64{0.1 + 0.2 - 1e-12}, true, []float64{-1e-12}, 0},
		{"short by 2", bucket.ModeTake, []float64{5}, []float64{3}, false, []float64{3}, 2 * time.Second},
		{"longest wait wins", bucket.ModeTake, []float64{5, 8}, []float64{3, 1}, false, []float64{3, 1}, 7 * time.Second},
		{"one denies, none charged", bucket.ModeTake, []float64{1, 5}, []float64{10, 0}, false, []float64{10, 0}, 5 * time.Second},
		{"over capacity has no wait", bucket.ModeTake, []float64{11, 5}, []float64{10, 0}, false, []float64{10, 0}, 0},
		{"adjust into debt", bucket.ModeAdjust, []float64{15}, []float64{10}, true, []float64{-5}, 0},
		{"refund capped at capacity", bucket.ModeAdjust, []float64{-7}, []float64{6}, true, []float64{10}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			req := bucket.Request{Subject: "s", Mode: tc.mode}
			for i, c := range tc.cost {
				req.Charges = append(req.Charges, bucket.Charge{Bucket: fmt.Sprint("b", i), Limit: lim, Cost: c})
			}
			tokens := append([]float64(nil), tc.tokens...)
			d := bucket.Decide(req, tokens)
			if d.Allowed != tc.wantAllowed || d.RetryAfter != tc.wantRetry {
				t.Fatalf("Decide = Allowed %v RetryAfter %v, want %v %v", d.Allowed, d.RetryAfter, tc.wantAllowed, tc.wantRetry)
			}
			for i, want := range tc.wantRemaining {
				if math.Abs(d.Buckets[i].Remaining-want) > 1e-9 {
					t.Errorf("Buckets[%d].Remaining = %v, want %v", i, d.Buckets[i].Remaining, want)
				}
			}
			for i := range tokens {
				if tokens[i] != tc.tokens[i] {
					t.Fatal("Decide modified its tokens argument")
				}
			}
		})
	}
}

func TestDenying(t *testing.T) {
	t.Parallel()
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	req := bucket.Request{Subject: "s", Charges: []bucket.Charge{
		{Bucket: "ok", Limit: lim, Cost: 1},
		{Bucket: "slow", Limit: lim, Cost: 9},
		{Bucket: "fast", Limit: lim, Cost: 2},
	}}
	if b, ok := bucket.Decide(req, []float64{10, 0, 0}).Denying(); !ok || b.Bucket != "slow" {
		t.Fatalf("Denying = %q, %v; want slow", b.Bucket, ok)
	}
	req.Charges[2].Cost = 20
	if b, ok := bucket.Decide(req, []float64{10, 0, 0}).Denying(); !ok || b.Bucket != "fast" || !b.OverCapacity() {
		t.Fatalf("Denying = %q, %v; want the over-capacity bucket", b.Bucket, ok)
	}
	if _, ok := bucket.Decide(req, []float64{10, 10, 10}).Denying(); !ok {
		t.Fatal("over-capacity request not denied")
	}
	req.Charges = req.Charges[:1]
	if _, ok := bucket.Decide(req, []float64{10}).Denying(); ok {
		t.Fatal("allowed request reports a denying bucket")
	}
}

func TestValidateWrapsErrInvalidRequest(t *testing.T) {
	t.Parallel()
	err := bucket.Request{}.Validate()
	if !errors.Is(err, bucket.ErrInvalidRequest) {
		t.Fatalf("err = %v, want ErrInvalidRequest", err)
	}
	if got := bucket.Mode(9).String(); got != "Mode(9)" {
		t.Fatalf("Mode(9).String() = %q", got)
	}
}

func TestDecideDuplicate(t *testing.T) {
	t.Parallel()
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 2}
	for _, tc := range []struct {
		name      string
		mode      bucket.Mode
		cost      float64
		tokens    float64
		wantReset time.Duration
	}{
		{"take that could pay", bucket.ModeTake, 1, 6, 2 * time.Second},
		{"take that could not pay now", bucket.ModeTake, 8, 1, 4500 * time.Millisecond},
		{"take over capacity", bucket.ModeTake, 20, 10, 0},
		{"adjust in debt", bucket.ModeAdjust, 5, -4, 7 * time.Second},
		{"refund", bucket.ModeAdjust, -3, 9, 500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			req := bucket.Request{Subject: "s", Mode: tc.mode, ID: "x", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: tc.cost}}}
			tokens := []float64{tc.tokens}
			d := bucket.DecideDuplicate(req, tokens)
			want := bucket.BucketState{Bucket: "b", Limit: lim, Cost: tc.cost, Allowed: true, Remaining: tc.tokens, ResetAfter: tc.wantReset}
			if !d.Allowed || !d.Duplicate || d.RetryAfter != 0 || len(d.Buckets) != 1 || d.Buckets[0] != want {
				t.Fatalf("DecideDuplicate = %+v, want allowed duplicate with %+v", d, want)
			}
			if tokens[0] != tc.tokens {
				t.Fatal("DecideDuplicate modified its tokens argument")
			}
			if _, ok := d.Denying(); ok {
				t.Fatal("a duplicate reports a denying bucket")
			}
		})
	}
	if d := bucket.Decide(bucket.Request{Subject: "s", ID: "x", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 1}}}, []float64{5}); d.Duplicate {
		t.Fatal("Decide reports a duplicate")
	}
}

func TestRequestID(t *testing.T) {
	t.Parallel()
	charges := []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 1, RefillPerSecond: 1}, Cost: 1}}
	for _, tc := range []struct {
		name    string
		id      string
		wantErr string // empty: valid
	}{
		{"none", "", ""},
		{"uuid", "0f8fad5b-d9cb-469f-a165-70867728950e", ""},
		{"any bytes", "\x00{}\xff", ""},
		{"longest", strings.Repeat("i", bucket.MaxIDBytes), ""},
		{"too long", strings.Repeat("i", bucket.MaxIDBytes+1), "bucket: invalid request: id is 129 bytes, want at most 128"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := bucket.Request{Subject: "s", ID: tc.id, Charges: charges}.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, bucket.ErrInvalidRequest) || err.Error() != tc.wantErr {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestLeaseRequestValidate(t *testing.T) {
	t.Parallel()
	valid := bucket.LeaseRequest{Subject: "user:alice", Name: "generate_streams", Limit: 2, ID: "call-1", TTL: time.Minute}
	for _, tc := range []struct {
		name    string
		change  func(*bucket.LeaseRequest)
		wantErr string // empty: valid
	}{
		{"valid", func(*bucket.LeaseRequest) {}, ""},
		{"limit 1, ttl 1ns", func(r *bucket.LeaseRequest) { r.Limit, r.TTL = 1, time.Nanosecond }, ""},
		{"longest id", func(r *bucket.LeaseRequest) { r.ID = strings.Repeat("i", bucket.MaxIDBytes) }, ""},
		{"empty subject", func(r *bucket.LeaseRequest) { r.Subject = "" }, "lease subject is empty"},
		{"empty name", func(r *bucket.LeaseRequest) { r.Name = "" }, "lease name is empty"},
		{"empty id", func(r *bucket.LeaseRequest) { r.ID = "" }, "lease id is empty"},
		{"long id", func(r *bucket.LeaseRequest) { r.ID = strings.Repeat("i", 200) }, "lease id is 200 bytes, want 1 to 128"},
		{"zero limit", func(r *bucket.LeaseRequest) { r.Limit = 0 }, "lease limit must be at least 1, got 0"},
		{"negative limit", func(r *bucket.LeaseRequest) { r.Limit = -1 }, "lease limit must be at least 1, got -1"},
		{"zero ttl", func(r *bucket.LeaseRequest) { r.TTL = 0 }, "lease ttl must be greater than 0, got 0s"},
		{"negative ttl", func(r *bucket.LeaseRequest) { r.TTL = -time.Millisecond }, "lease ttl must be greater than 0, got -1ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := valid
			tc.change(&r)
			err := r.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				if err := bucket.ValidateLease(r.Subject, r.Name, r.ID); err != nil {
					t.Fatalf("ValidateLease: %v", err)
				}
				return
			}
			if want := "bucket: invalid request: " + tc.wantErr; !errors.Is(err, bucket.ErrInvalidRequest) || err.Error() != want {
				t.Fatalf("err = %v, want %q", err, want)
			}
		})
	}
}

func TestMayHaveApplied(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"invalid request", fmt.Errorf("store: %w: subject is empty", bucket.ErrInvalidRequest), false},
		{"not applied", fmt.Errorf("store: take: %w: dial tcp: connection refused", bucket.ErrNotApplied), false},
		{"breaker open", fmt.Errorf("breaker: %w: %w", bucket.ErrNotApplied, bucket.ErrUnavailable), false},
		{"unknown", fmt.Errorf("store: take: %w: i/o timeout", bucket.ErrOutcomeUnknown), true},
		{"unclassified", errors.New("something went wrong"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := bucket.MayHaveApplied(tc.err); got != tc.want {
				t.Fatalf("MayHaveApplied(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

func TestRequestWindow(t *testing.T) {
	t.Parallel()
	if got := (bucket.Request{}).Window(); got != bucket.DefaultIDWindow {
		t.Errorf("zero IDWindow: Window() = %v, want %v", got, bucket.DefaultIDWindow)
	}
	if got := (bucket.Request{IDWindow: time.Minute}).Window(); got != time.Minute {
		t.Errorf("Window() = %v, want 1m", got)
	}
}
