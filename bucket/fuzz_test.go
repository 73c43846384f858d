package bucket_test

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/big"
	"slices"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// The fuzz input is a few limits and a sequence of steps, stepBytes each.
const (
	maxFuzzBuckets = 4
	stepBytes      = 8
	maxFuzzSteps   = 128
	// maxFuzzInstant keeps the fuzzed clock, in nanoseconds, far from
	// overflowing an int64 however far the steps advance it.
	maxFuzzInstant = 1 << 62
)

// decideTolerance is bucket's documented tolerance: a level within
// 1e-9·max(1, cost) below the cost still pays it.
const decideTolerance = 1e-9

// floatNoise bounds, relative to the largest magnitude involved, the
// rounding error of the few float64 operations of one refill or wait
// (each rounds by at most 2⁻⁵³ ≈ 1.1e-16).
const floatNoise = 1e-15

// FuzzDecide drives buckets through [bucket.Limit.Refill] and
// [bucket.Decide] the way stores do (each bucket keeps a level and the
// instant of its last applied charge; a request refills its buckets to the
// present, decides, and stores each Remaining if it was allowed) and checks
// every decision against an exact model in rational arithmetic:
//
//   - a take is allowed when every bucket holds its cost, and denied when
//     one lacks more than the tolerance; nothing changes when it is denied;
//   - Remaining is the refilled level minus the cost (or the level, when
//     denied), and no bucket ever holds more than its capacity, even after
//     an adjustment that returns tokens;
//   - RetryAfter is enough (after it, the same request is allowed) and at
//     most 1ns more than the exact wait, beyond float rounding;
//   - ResetAfter is how long the bucket takes to be full, to the ns.
//
// The input decodes into valid limits and requests whatever its bytes (see
// fuzzLimits and decodeStep): four floats give the limits of up to four
// buckets (how many is the uint8), and each 8 bytes of the []byte are a
// step. Byte 0 of a step holds the mode (bit 0: adjust), which buckets it
// charges (bits 1-4, none meaning all) and the kind of cost (bits 5-7, see
// costFraction); bytes 1-3 are how far the clock advances, in ns, shifted
// left by byte 4; bytes 5-6 (little endian) and 7 parametrise the cost.
// The seeds in testdata/fuzz/FuzzDecide are named after what they drive.
func FuzzDecide(f *testing.F) {
	f.Fuzz(func(t *testing.T, capacity, refill, capacity2, refill2 float64, nBuckets uint8, input []byte) {
		limits := fuzzLimits(capacity, refill, capacity2, refill2, nBuckets)
		m := &fuzzModel{t: t, limits: limits, state: make([]storedBucket, len(limits))}
		for i, l := range limits {
			m.state[i].level = l.Capacity // a bucket never used is full
		}
		for n := 0; len(input) >= stepBytes && n < maxFuzzSteps; n++ {
			m.step(n, input[:stepBytes])
			input = input[stepBytes:]
		}
	})
}

// Kinds of cost a step asks, in bits 5-7 of its first byte.
const (
	costFraction = iota // cost = capacity · value/32768: 0 to 2× capacity
	costLevel           // cost = the bucket's level, nudged by exp·1e-10 relative
	costAbsolute        // cost = value · 2^(exp%64 − 40)
	costZero
	costCapacity // cost = capacity, or MaxTokens if exp is odd
)

// fuzzLimits returns 1 to 4 valid limits made from the fuzzed numbers.
func fuzzLimits(capacity, refill, capacity2, refill2 float64, n uint8) []bucket.Limit {
	all := []bucket.Limit{
		{Capacity: positive(capacity), RefillPerSecond: positive(refill)},
		{Capacity: positive(capacity2), RefillPerSecond: positive(refill2)},
		{Capacity: positive(capacity * 3), RefillPerSecond: positive(refill / 7)},
		{Capacity: positive(capacity2 / 5), RefillPerSecond: positive(refill2 * 11)},
	}
	return all[:1+int(n)%maxFuzzBuckets]
}

// positive clamps v into (0, MaxTokens].
func positive(v float64) float64 {
	v = math.Abs(v)
	switch {
	case math.IsNaN(v) || v == 0:
		return 1
	case v > bucket.MaxTokens:
		return bucket.MaxTokens
	}
	return v
}

// storedBucket is what a store keeps of a bucket: its level at an instant.
type storedBucket struct {
	level float64
	at    int64 // nanoseconds on the fuzzed clock
}

type fuzzModel struct {
	t      *testing.T
	limits []bucket.Limit
	state  []storedBucket
	now    int64
}

// decodeStep advances the clock and returns the request a step's bytes
// describe, the index of the bucket each of its charges names, and those
// buckets' levels refilled to the new present.
func (m *fuzzModel) decodeStep(b []byte) (bucket.Request, []int, []float64) {
	adjust := b[0]&1 != 0
	mask := int(b[0]>>1) & 0xf & (1<<len(m.limits) - 1)
	if mask == 0 {
		mask = 1<<len(m.limits) - 1
	}
	kind := b[0] >> 5
	advance := uint64(b[1]) | uint64(b[2])<<8 | uint64(b[3])<<16
	if shift := b[4] % 64; shift >= 40 || advance<<shift > uint64(maxFuzzInstant-m.now) {
		advance = uint64(maxFuzzInstant - m.now)
	} else {
		advance <<= shift
	}
	m.now += int64(advance)
	value := float64(binary.LittleEndian.Uint16(b[5:]))
	exp := b[7]
	negative := adjust && exp&0x80 != 0

	req := bucket.Request{Subject: "fuzz"}
	if adjust {
		req.Mode = bucket.ModeAdjust
	}
	var which []int
	var levels []float64
	for i, l := range m.limits {
		if mask&(1<<i) == 0 {
			continue
		}
		level := l.Refill(m.state[i].level, time.Duration(m.now-m.state[i].at))
		var cost float64
		switch kind {
		case costFraction:
			cost = l.Capacity * value / 32768
		case costLevel:
			cost = math.Max(0, level) * (1 + float64(int8(exp))*1e-10)
			negative = false
		case costAbsolute:
			cost = math.Ldexp(value, int(exp%64)-40)
		case costCapacity:
			cost = l.Capacity
			if exp&1 != 0 {
				cost = bucket.MaxTokens
			}
		default: // costZero and unused kinds
		}
		cost = math.Min(cost, bucket.MaxTokens)
		if negative {
			cost = -cost
		}
		req.Charges = append(req.Charges, bucket.Charge{Bucket: fmt.Sprint("b", i), Limit: l, Cost: cost})
		which = append(which, i)
		levels = append(levels, level)
	}
	return req, which, levels
}

func (m *fuzzModel) step(n int, b []byte) {
	t := m.t
	req, which, levels := m.decodeStep(b)
	if err := req.Validate(); err != nil {
		t.Fatalf("step %d: the decoder made an invalid request: %v", n, err)
	}
	tokens := slices.Clone(levels)
	d := bucket.Decide(req, tokens)
	if !slices.Equal(tokens, levels) {
		t.Fatalf("step %d: Decide modified its levels: %v, was %v", n, tokens, levels)
	}
	if len(d.Buckets) != len(req.Charges) || d.Duplicate {
		t.Fatalf("step %d: decision %+v for %d charges", n, d, len(req.Charges))
	}
	fail := func(i int, format string, args ...any) {
		t.Helper()
		c := req.Charges[i]
		t.Fatalf("step %d at %dns, %v of %d buckets, bucket %s (capacity %v, refill %v/s, stored %v at %dns, refilled %v), cost %v: %s\ndecision: %+v",
			n, m.now, req.Mode, len(req.Charges), c.Bucket, c.Limit.Capacity, c.Limit.RefillPerSecond,
			m.state[which[i]].level, m.state[which[i]].at, levels[i], c.Cost, fmt.Sprintf(format, args...), d)
	}

	exact := make([]*big.Rat, len(req.Charges)) // the exact refilled levels
	band := make([]float64, len(req.Charges))   // float noise allowed around them
	allAllowed, overCapacity := true, false
	var wantRetry time.Duration
	for i, c := range req.Charges {
		b, st := d.Buckets[i], m.state[which[i]]
		exact[i] = exactRefill(c.Limit, st.level, m.now-st.at)
		band[i] = floatNoise * maxAbs(1, st.level, c.Limit.Capacity, c.Cost)
		if diff := math.Abs(levels[i] - ratFloat(exact[i])); diff > band[i] {
			fail(i, "Refill gave %v, exactly %v", levels[i], ratFloat(exact[i]))
		}
		if b.Bucket != c.Bucket || b.Limit != c.Limit || b.Cost != c.Cost {
			fail(i, "the bucket's state does not echo its charge")
		}
		allAllowed = allAllowed && b.Allowed
		// OverCapacity reads the costs whatever the mode; it matters only
		// for a denial.
		overCapacity = overCapacity || c.Cost > c.Limit.Capacity
		if req.Mode == bucket.ModeAdjust {
			checkAdjust(i, c, b, exact[i], band[i], fail)
			continue
		}
		if c.Cost > c.Limit.Capacity {
			if b.Allowed || b.RetryAfter != 0 || !b.OverCapacity() {
				fail(i, "a cost above capacity must deny with no RetryAfter")
			}
			continue
		}
		tol := decideTolerance * math.Max(1, c.Cost)
		margin := ratFloat(sub(exact[i], rat(c.Cost)))
		switch {
		case margin >= 2*band[i] && !b.Allowed:
			fail(i, "denied, but the bucket holds %v more than the cost", margin)
		case margin < -tol-2*band[i] && b.Allowed:
			fail(i, "allowed, but the bucket lacks %v, beyond the tolerance %v", -margin, tol)
		case b.Allowed && b.RetryAfter != 0:
			fail(i, "allowed with RetryAfter %v", b.RetryAfter)
		case !b.Allowed:
			checkRetry(i, req, levels, exact[i], band[i], b, fail)
			wantRetry = max(wantRetry, b.RetryAfter)
		}
	}

	if d.Allowed != (allAllowed || req.Mode == bucket.ModeAdjust) || d.OverCapacity() != overCapacity {
		t.Fatalf("step %d: Allowed %v and OverCapacity %v, but the buckets allow %v and overCapacity is %v: %+v",
			n, d.Allowed, d.OverCapacity(), allAllowed, overCapacity, d)
	}
	if d.Allowed || overCapacity {
		wantRetry = 0
	}
	if d.RetryAfter != wantRetry {
		t.Fatalf("step %d: RetryAfter %v, want the longest of the buckets', %v: %+v", n, d.RetryAfter, wantRetry, d)
	}
	if !d.Allowed && !overCapacity {
		m.checkRequestRetry(n, req, which, d)
	}
	for i, c := range req.Charges {
		b := d.Buckets[i]
		switch {
		case !d.Allowed && b.Remaining != levels[i]:
			fail(i, "denied, but Remaining %v is not the level", b.Remaining)
		case d.Allowed && req.Mode == bucket.ModeTake && math.Abs(b.Remaining-ratFloat(sub(exact[i], rat(c.Cost)))) > 2*band[i]:
			fail(i, "Remaining %v, exactly %v", b.Remaining, ratFloat(sub(exact[i], rat(c.Cost))))
		case d.Allowed && req.Mode == bucket.ModeTake && b.Remaining < -decideTolerance*math.Max(1, c.Cost)-2*band[i]:
			fail(i, "a take left a debt of %v", -b.Remaining)
		case b.Remaining > c.Limit.Capacity:
			fail(i, "Remaining %v is above capacity", b.Remaining)
		}
		checkReset(i, c.Limit, b, fail)
	}

	if d.Allowed {
		for i, b := range d.Buckets {
			m.state[which[i]] = storedBucket{level: b.Remaining, at: m.now}
		}
	}
}

// checkAdjust checks an adjustment: always applied, exact, and never above
// capacity.
func checkAdjust(i int, c bucket.Charge, b bucket.BucketState, exact *big.Rat, band float64, fail func(int, string, ...any)) {
	want := sub(exact, rat(c.Cost))
	if want.Cmp(rat(c.Limit.Capacity)) > 0 {
		want = rat(c.Limit.Capacity)
	}
	switch {
	case !b.Allowed || b.RetryAfter != 0:
		fail(i, "an adjustment was not allowed")
	case math.Abs(b.Remaining-ratFloat(want)) > 2*band:
		fail(i, "adjusted to %v, exactly %v", b.Remaining, ratFloat(want))
	}
}

// checkRetry checks a denied bucket's RetryAfter against the exact wait
// until it holds its cost: enough, and at most 1ns more than needed beyond
// the float rounding of the level and the wait.
func checkRetry(i int, req bucket.Request, levels []float64, exact *big.Rat, band float64, b bucket.BucketState, fail func(int, string, ...any)) {
	c := req.Charges[i]
	if b.RetryAfter <= 0 {
		fail(i, "denied with RetryAfter %v", b.RetryAfter)
	}
	// The exact wait, in ns: (cost − level) / rate · 1e9.
	wait := ratFloat(nanos(sub(rat(c.Cost), exact), c.Limit))
	if b.RetryAfter == math.MaxInt64 {
		if wait < math.MaxInt64*(1-floatNoise) {
			fail(i, "RetryAfter saturated, but the exact wait is %vns", wait)
		}
		return
	}
	// Past a deep debt, RetryAfter covers the rounding of a refill too:
	// about 1e-15 of the deficit.
	slack := float64(b.RetryAfter)*(2*floatNoise) + band/c.Limit.RefillPerSecond*1e9
	if float64(b.RetryAfter) > math.Ceil(wait)+1+slack {
		fail(i, "RetryAfter %v is more than 1ns above the exact wait %vns", b.RetryAfter, wait)
	}
	tol := decideTolerance * math.Max(1, c.Cost)
	if float64(b.RetryAfter) < wait-(tol+2*band)/c.Limit.RefillPerSecond*1e9-slack {
		fail(i, "RetryAfter %v is short of the exact wait %vns", b.RetryAfter, wait)
	}
	// Waiting RetryAfter is enough for this bucket alone.
	alone := bucket.Request{Subject: req.Subject, Charges: []bucket.Charge{c}}
	if later := bucket.Decide(alone, []float64{c.Limit.Refill(levels[i], b.RetryAfter)}); !later.Allowed {
		fail(i, "still denied after waiting RetryAfter %v: %+v", b.RetryAfter, later)
	}
}

// checkRequestRetry checks that a denied request is allowed once every
// bucket has refilled for the decision's RetryAfter, as a store would refill
// them from what it stored.
func (m *fuzzModel) checkRequestRetry(n int, req bucket.Request, which []int, d bucket.Decision) {
	if d.RetryAfter == math.MaxInt64 {
		return
	}
	later := make([]float64, len(req.Charges))
	for i, c := range req.Charges {
		st := m.state[which[i]]
		elapsed := m.now - st.at
		if elapsed > math.MaxInt64-int64(d.RetryAfter) {
			return // beyond the clock's range
		}
		later[i] = c.Limit.Refill(st.level, time.Duration(elapsed)+d.RetryAfter)
	}
	again := bucket.Decide(req, later)
	if again.Allowed {
		return
	}
	// Refilling a bucket from what it stored rounds by a few ulps of the
	// stored level, which for an extreme debt (billions of capacities) is
	// more than the tolerance; bucket documents that a retry of such a
	// bucket may be denied again, short by no more than that rounding.
	for i, c := range req.Charges {
		b := again.Buckets[i]
		noise := 4 * floatNoise * maxAbs(1, m.state[which[i]].level, c.Limit.Capacity, c.Cost)
		if !b.Allowed && (c.Cost > c.Limit.Capacity || c.Cost-b.Remaining > noise+decideTolerance*math.Max(1, c.Cost)) {
			m.t.Fatalf("step %d: denied with RetryAfter %v, and denied again after waiting it, bucket %d short by %v (levels %v): %+v",
				n, d.RetryAfter, i, c.Cost-b.Remaining, later, again)
		}
	}
}

// checkReset checks ResetAfter against the exact time to refill Remaining
// to capacity, and that refilling for ResetAfter fills the bucket.
func checkReset(i int, l bucket.Limit, b bucket.BucketState, fail func(int, string, ...any)) {
	if b.Remaining >= l.Capacity {
		if b.ResetAfter != 0 {
			fail(i, "full, but ResetAfter is %v", b.ResetAfter)
		}
		return
	}
	full := ratFloat(nanos(sub(rat(l.Capacity), rat(b.Remaining)), l))
	if b.ResetAfter == math.MaxInt64 {
		if full < math.MaxInt64*(1-floatNoise) {
			fail(i, "ResetAfter saturated, but the bucket is full in %vns", full)
		}
		return
	}
	// Below 1ns, the wait may underflow to 0 (a subnormal capacity).
	slack := full * floatNoise
	if got := float64(b.ResetAfter); got < full-slack-1 || got > math.Ceil(full+slack)+1 {
		fail(i, "ResetAfter %v, but the bucket is full in exactly %vns", b.ResetAfter, full)
	}
	if level := l.Refill(b.Remaining, b.ResetAfter); level < l.Capacity-floatNoise*maxAbs(1, l.Capacity, b.Remaining) {
		fail(i, "refilling for ResetAfter %v reaches only %v", b.ResetAfter, level)
	}
}

// exactRefill is the level of a bucket that held level elapsed ago: level
// plus elapsed·rate, at most capacity, computed exactly.
func exactRefill(l bucket.Limit, level float64, elapsedNanos int64) *big.Rat {
	r := rat(level)
	if elapsedNanos > 0 {
		add := new(big.Rat).SetFrac64(elapsedNanos, int64(time.Second))
		r.Add(r, add.Mul(add, rat(l.RefillPerSecond)))
	}
	if c := rat(l.Capacity); r.Cmp(c) > 0 {
		return c
	}
	return r
}

// nanos is how many nanoseconds a bucket of limit l takes to refill tokens.
func nanos(tokens *big.Rat, l bucket.Limit) *big.Rat {
	r := new(big.Rat).Quo(tokens, rat(l.RefillPerSecond))
	return r.Mul(r, new(big.Rat).SetInt64(int64(time.Second)))
}

func rat(f float64) *big.Rat { return new(big.Rat).SetFloat64(f) }

func sub(a, b *big.Rat) *big.Rat { return new(big.Rat).Sub(a, b) }

func ratFloat(r *big.Rat) float64 {
	f, _ := r.Float64()
	return f
}

func maxAbs(vs ...float64) float64 {
	m := 0.0
	for _, v := range vs {
		m = math.Max(m, math.Abs(v))
	}
	return m
}
