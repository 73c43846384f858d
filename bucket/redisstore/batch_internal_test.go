package redisstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// TestBatchScriptRejectsMalformedBatches sends batch.lua malformed
// batches whose first operation is a valid take: the script refuses each
// batch as a whole, before writing anything.
func TestBatchScriptRejectsMalformedBatches(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	const good = "take - b 5 1 1"
	goodKeys := []string{"v:{a}"}
	for _, tc := range []struct {
		name    string
		keys    []string
		args    []any
		wantErr string
	}{
		{name: "no operations", keys: nil, args: []any{""}, wantErr: "at least one operation"},
		{name: "bad now", keys: goodKeys, args: []any{"soon", good}, wantErr: "now is not a number"},
		{name: "NaN now", keys: goodKeys, args: []any{"nan", good}, wantErr: "now is not a number"},
		{name: "unknown operation", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "charge - c 5 1 1"}, wantErr: "operation 2: unknown operation charge"},
		{name: "empty operation", keys: goodKeys, args: []any{"", good, ""}, wantErr: "operation 2: unknown operation nil"},
		{name: "take without buckets", keys: goodKeys, args: []any{"", good, "take -"}, wantErr: "operation 2: take wants a window and a name and 3 numbers per bucket"},
		{name: "take with a partial bucket", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - c 5 1"}, wantErr: "operation 2: take wants"},
		{name: "take without a name", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - 5 1 1"}, wantErr: "operation 2: take wants"},
		{name: "zero window", keys: append(goodKeys, "v:{a}", "v:{a}~id:x"), args: []any{"", good, "adjust 0 c 5 1 1"}, wantErr: "window is not a positive number: 0"},
		{name: "NaN window", keys: append(goodKeys, "v:{a}", "v:{a}~id:x"), args: []any{"", good, "adjust nan c 5 1 1"}, wantErr: "window is not a positive number"},
		{name: "NaN cost", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - c 5 1 nan"}, wantErr: "bucket 1: capacity, rate or cost is not a number"},
		{name: "infinite capacity", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - c inf 1 1"}, wantErr: "bucket 1: capacity, rate or cost is not a number"},
		{name: "zero rate", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - c 5 1 1 d 5 0 1"}, wantErr: "bucket 2: capacity and rate must be positive"},
		{name: "negative capacity", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - c -5 1 1"}, wantErr: "bucket 1: capacity and rate must be positive"},
		{name: "acquire without ttl", keys: append(goodKeys, "v:{a}~lease:n"), args: []any{"", good, "acquire 1 m"}, wantErr: "operation 2: acquire wants"},
		{name: "acquire with zero limit", keys: append(goodKeys, "v:{a}~lease:n"), args: []any{"", good, "acquire 0 100 m"}, wantErr: "operation 2: acquire wants"},
		{name: "take with a bucket and a name", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - c 5 1 1 d"}, wantErr: "operation 2: take wants"},
		{name: "take with a trailing space", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take - c 5 1 1 "}, wantErr: "operation 2: take wants"},
		{name: "acquire with six fields", keys: append(goodKeys, "v:{a}~lease:n"), args: []any{"", good, "acquire 1 100 m n o"}, wantErr: "operation 2: acquire wants"},
		{name: "release with five members", keys: append(goodKeys, "v:{a}~lease:n"), args: []any{"", good, "release m n o p q"}, wantErr: "operation 2: release wants a member"},
		{name: "release with two members", keys: append(goodKeys, "v:{a}~lease:n"), args: []any{"", good, "release m n"}, wantErr: "operation 2: release wants a member"},
		{name: "too few keys", keys: goodKeys, args: []any{"", good, good}, wantErr: "the operations name 2 keys, got 1"},
		{name: "too many keys", keys: append(goodKeys, "v:{a}", "v:{a}~id:x"), args: []any{"", good, good}, wantErr: "the operations name 2 keys, got 3"},
		{name: "marker key missing", keys: append(goodKeys, "v:{a}"), args: []any{"", good, "take 1000 c 5 1 1"}, wantErr: "the operations name 3 keys, got 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// Each case has keys of its own, so that "nothing written"
			// means nothing.
			prefix := strings.ReplaceAll(tc.name, " ", "-")
			keys := make([]string, len(tc.keys))
			for i, k := range tc.keys {
				keys[i] = prefix + k
			}
			err := batchScript.Run(t.Context(), client, keys, tc.args...).Err()
			var rerr redis.Error
			if !errors.As(err, &rerr) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("batch.lua: %v, want an error reply mentioning %q", err, tc.wantErr)
			}
			if n, err := client.Exists(t.Context(), keys...).Result(); len(keys) > 0 && (err != nil || n != 0) {
				t.Fatalf("the rejected batch wrote %d of its keys (%v)", n, err)
			}
		})
	}
}

// TestBatchScriptReplies checks the shape of batch.lua's replies, one per
// operation in order, on a test clock.
func TestBatchScriptReplies(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	if err := client.HSet(t.Context(), "r:{a}", "bad", "x").Err(); err != nil {
		t.Fatal(err)
	}
	keys := []string{"r:{a}", "r:{a}", "r:{a}", "r:{a}~id:x", "r:{a}", "r:{a}~id:x", "r:{a}", "r:{a}", "r:{a}", "r:{a}~lease:n", "r:{a}~lease:n", "r:{a}~lease:n"}
	args := []any{
		"1000000",
		"take - b 5 1 2",
		"take - b 5 1 4",           // denied: 3 left
		"adjust 2000000 c 3 1 0.5", // writes c and the marker
		"take 2000000 b 5 1 9",     // a duplicate, though it could not pay
		"take - b 5 1 0",
		"take - b 5 1 0 c 3 1 0 d 7 1 0", // the levels of three buckets, in order
		"take - c 3 1 1 bad 5 1 1",       // a malformed bucket: fails alone
		"acquire 1 500 m1",
		"acquire 1 500 m2",
		"release m1",
	}
	text, err := batchScript.Run(t.Context(), client, keys, args...).Text()
	if err != nil {
		t.Fatal(err)
	}
	// One line per operation. A bucket request's line has its verdict,
	// the present (1 s) and each bucket as it was: "-" when full, else its
	// stored value.
	wantReplies := []string{
		"1 1000000 -",
		"0 1000000 -200000023",
		"1 1000000 -",
		"2 1000000 -200000023",
		"1 1000000 -200000023",
		"1 1000000 -200000023 -150000022 -",
		"!ERR connectlimit batch.lua: malformed bucket value at key r:{a}, field bad",
		"1 1",
		"0 1",
		"0 0",
	}
	reply, err := splitLines(text, len(args)-1)
	if err != nil || !slices.Equal(reply, wantReplies) {
		t.Fatalf("replies:\n%q (%v)\nwant\n%q", strings.Split(text, "\n"), err, wantReplies)
	}
	// The levels the client reads from them, before each charge.
	b, c, d := bucket.Limit{Capacity: 5, RefillPerSecond: 1}, bucket.Limit{Capacity: 3, RefillPerSecond: 1}, bucket.Limit{Capacity: 7, RefillPerSecond: 1}
	for i, want := range []struct {
		limits []bucket.Limit
		levels []float64
	}{
		{[]bucket.Limit{b}, []float64{5}},
		{[]bucket.Limit{b}, []float64{3}},
		{[]bucket.Limit{c}, []float64{3}},
		{[]bucket.Limit{b}, []float64{3}},
		{[]bucket.Limit{b}, []float64{3}},
		{[]bucket.Limit{b, c, d}, []float64{3, 2.5, 7}},
	} {
		charges := make([]bucket.Charge, len(want.limits))
		for j, l := range want.limits {
			charges[j].Limit = l
		}
		levels := make([]float64, len(charges))
		if _, err := parseReply(reply[i], charges, levels); err != nil || !slices.Equal(levels, want.levels) {
			t.Errorf("reply %d: levels %v, %v; want %v", i, levels, err, want.levels)
		}
	}
	// The stored state: b and c hold their empty instants, the present
	// (1 s) less their levels (3 and 2.5 tokens, at 1 token per second), in
	// microseconds, followed by their fill classes, two digits: b fills in
	// 5 s, at most 2^23 µs, c in 3 s, at most 2^22 µs; d is full, so not
	// stored; bad is as it was. The expiry field holds the instant in
	// milliseconds when the last of them is full, and then some: b, at
	// 3 s, plus a millisecond.
	want := map[string]string{"b": "-200000023", "c": "-150000022", "bad": "x", ExpiryField: "3001"}
	if got, err := client.HGetAll(t.Context(), "r:{a}").Result(); err != nil || !maps.Equal(got, want) {
		t.Fatalf("HGETALL r:{a} = %v, %v", got, err)
	}
}

// TestRefused checks which client errors prove that nothing was applied.
func TestRefused(t *testing.T) {
	t.Parallel()
	dial := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	read := &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
	for _, tc := range []struct {
		name        string
		err         error
		wantRefused bool
	}{
		{"refused dial", dial, true},
		{"wrapped dial", fmt.Errorf("redis: %w", dial), true},
		{"pool timeout", redis.ErrPoolTimeout, true},
		{"pool exhausted", redis.ErrPoolExhausted, true},
		{"closed client", redis.ErrClosed, true},
		{"error reply", redis.ErrNoScript, true},
		{"cross slot", redis.ErrCrossSlot, true},
		{"read timeout", read, false},
		{"write reset", &net.OpError{Op: "write", Net: "tcp", Err: syscall.ECONNRESET}, false},
		{"EOF", io.EOF, false},
		{"unexpected EOF", io.ErrUnexpectedEOF, false},
		{"deadline", context.DeadlineExceeded, false},
		{"canceled", context.Canceled, false},
		{"malformed", errors.New("redis: can't parse reply"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := refused(tc.err); got != tc.wantRefused {
				t.Fatalf("refused(%v) = %v, want %v", tc.err, got, tc.wantRefused)
			}
			for _, oneAttempt := range []bool{true, false} {
				err := (&Store{oneAttempt: oneAttempt}).failure(tc.err)
				want := bucket.ErrOutcomeUnknown
				if oneAttempt && tc.wantRefused {
					want = bucket.ErrNotApplied
				}
				if !errors.Is(err, want) || !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.err.Error()) {
					t.Errorf("failure(%v) with oneAttempt %v = %v, want it to wrap %v and the error", tc.err, oneAttempt, err, want)
				}
			}
		})
	}
}

// TestGroups checks how a batch is split into script calls: by slot for a
// Cluster, by tag otherwise, keeping the order within each group.
func TestGroups(t *testing.T) {
	t.Parallel()
	// Two tags in one slot, found by search.
	same := func() [2]string {
		seen := map[uint16]string{}
		for i := 0; ; i++ {
			tag := fmt.Sprint("user:", i)
			if prev, ok := seen[slot(tag)]; ok {
				return [2]string{prev, tag}
			}
			seen[slot(tag)] = tag
		}
	}()
	tags := []string{same[0], "other", same[1], same[0], "other", same[1]}
	ops := make([]*op, len(tags))
	for i, tag := range tags {
		ops[i] = &op{tag: tag, keys: []string{fmt.Sprintf("p:{%s}:b%d", tag, i)}, arg: fmt.Sprint("op", i)}
	}
	for _, tc := range []struct {
		name    string
		routing routing
		want    [][]int
	}{
		{"Slot", routeSlot, [][]int{{0, 2, 3, 5}, {1, 4}}},
		{"Tag", routeTag, [][]int{{0, 3}, {1, 4}, {2, 5}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			groups := (&Store{routing: tc.routing}).groups(ops, "now")
			if len(groups) != len(tc.want) {
				t.Fatalf("%d groups, want %d", len(groups), len(tc.want))
			}
			for i, g := range groups {
				// The keys and arguments are the ops' own strings, and a
				// command prints as its text (hooks print commands).
				var keys, args []any
				var printed []string
				for _, j := range tc.want[i] {
					keys = append(keys, (*text)(&ops[j].keys[0]))
					args = append(args, (*text)(&ops[j].arg))
					printed = append(printed, ops[j].keys[0])
				}
				want := append([]any{"evalsha", batchScript.Hash(), len(keys)}, keys...)
				want = append(append(want, "now"), args...)
				if !slices.Equal(g.args, want) {
					t.Errorf("group %d: args %v, want %v", i, g.args, want)
				}
				for _, j := range tc.want[i] {
					printed = append(printed, ops[j].arg)
				}
				wantCmd := fmt.Sprintf("evalsha %s %d %s now %s", batchScript.Hash(), len(keys), strings.Join(printed[:len(keys)], " "), strings.Join(printed[len(keys):], " "))
				if got := g.call(t.Context()).String(); got != wantCmd {
					t.Errorf("group %d prints as %q, want %q", i, got, wantCmd)
				}
			}
		})
	}
}

// TestBatchScriptRaisesTTLOncePerBatch checks the TTL and expiry field
// batch.lua leaves on group hashes on the server's clock, raised once per
// batch and never lowered: set on a hash the batch creates, raised on one
// whose expiry field says it lives too short, left alone on one whose field
// says it lives long enough, raised (never lowered) on a hash without the
// field (written by hand, or by an earlier version), whose field then
// tells the TTL it ends up with, and set on one that had no TTL; the
// longest any operation of the batch needs. It counts the commands: one
// PEXPIREAT per hash whose field the batch read, PEXPIREAT NX for one
// without, followed by PEXPIREAT GT and PEXPIRETIME when that hash had a
// TTL, and no sampling (HRANDFIELD) but for hashes that exist. It also
// runs the script as it runs on servers older than 7.0, which refuse NX:
// PTTL then does what NX, GT and PEXPIRETIME do.
func TestBatchScriptRaisesTTLOncePerBatch(t *testing.T) {
	t.Parallel()
	const flag = "local nx = true\n"
	if strings.Count(batchSource, flag) != 1 {
		t.Fatalf("batch.lua has no line %q", flag)
	}
	old := redis.NewScript(strings.Replace(batchSource, flag, "local nx = false\n", 1))
	for _, tc := range []struct {
		name   string
		script *redis.Script
		// The commands of the batch, beyond those of the common case.
		calls map[string]int
	}{
		// PEXPIREAT: NX for created, short, long, noTTL and twice, GT
		// after it for short and long, plain for known; none for swept,
		// whose field says it lives long enough.
		{"7.0", batchScript, map[string]int{"time": 1, "pexpireat": 8, "pexpiretime": 2, "pttl": 0}},
		// PTTL for created, short, long, noTTL and twice, each with a
		// TIME; PEXPIREAT for those but long, and for known.
		{"older", old, map[string]int{"time": 6, "pexpireat": 5, "pexpiretime": 0, "pttl": 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			raiseTTLOncePerBatch(t, tc.script, tc.calls)
		})
	}
}

func raiseTTLOncePerBatch(t *testing.T, script *redis.Script, calls map[string]int) {
	client := redistest.Start(t).NewClient(t)
	ctx := t.Context()
	const (
		created = "x:{g/1}"
		// Without an expiry field, with a TTL of 100 ms, of 1 hour, and
		// none.
		short = "x:{g/2}"
		long  = "x:{g/3}"
		noTTL = "x:{g/4}"
		twice = "x:{g/5}"
		// With expiry fields that agree with their TTLs: 100 ms and 1 hour.
		// All three of swept's buckets are full by their class: the sweep's
		// 4 samples are all of its fields, and delete all but the expiry
		// field.
		known = "x:{g/6}"
		swept = "x:{g/7}"
	)
	// A stranger's bucket that is not full (E far ahead), so that no sweep
	// deletes it; and stale ones, full (E = 1 µs, class 0).
	const stranger, debt, stale = "other/b", "9999999999999999923", "100"
	t0, err := client.Time(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	at := func(d time.Duration) string { return fmt.Sprint(t0.Add(d).UnixMilli()) }
	setup := map[string][]any{
		short: {stranger, debt},
		long:  {stranger, debt},
		noTTL: {stranger, debt},
		known: {stranger, debt, ExpiryField, at(100 * time.Millisecond)},
		swept: {"o1/b", stale, "o2/b", stale, "o3/b", stale, ExpiryField, at(time.Hour)},
	}
	for key, fields := range setup {
		if err := client.HSet(ctx, key, fields...).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for key, d := range map[string]time.Duration{short: 100 * time.Millisecond, long: time.Hour, known: 100 * time.Millisecond, swept: time.Hour} {
		if err := client.PExpireAt(ctx, key, t0.Add(d)).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := client.ConfigResetStat(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	keys := []string{created, short, long, noTTL, twice, twice, known, swept}
	// Buckets of 10 tokens at 1 token per second: taking 2 leaves 8, full
	// in 2 s; taking 5 leaves 5, full in 5 s.
	args := []any{"",
		"take - a/b 10 1 2",
		"take - a/b 10 1 2",
		"take - a/b 10 1 2",
		"take - a/b 10 1 2",
		"take - a/b 10 1 5",
		"take - c/b 10 1 2",
		"take - a/b 10 1 2",
		"take - a/b 10 1 2",
	}
	text, err := script.Run(ctx, client, keys, args...).Text()
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range strings.Split(text, "\n") {
		if !strings.HasPrefix(r, "1 ") {
			t.Fatalf("reply %d: %q, want applied", i, r)
		}
	}
	stats, err := client.Info(ctx, "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	// HRANDFIELD for the operations that add a bucket to a hash with an
	// expiry field: known, swept, and twice's second.
	calls = maps.Clone(calls)
	calls["pexpire"], calls["hrandfield"] = 0, 3
	for cmd, want := range calls {
		m := regexp.MustCompile(`(?m)^cmdstat_` + cmd + `:calls=(\d+),`).FindStringSubmatch(stats)
		got := "0"
		if m != nil {
			got = m[1]
		}
		if got != fmt.Sprint(want) {
			t.Errorf("%s calls: %s, want %d", cmd, got, want)
		}
	}
	for _, tc := range []struct {
		key  string
		want time.Duration
	}{
		{created, 2 * time.Second},
		{short, 2 * time.Second},
		{long, time.Hour},
		{noTTL, 2 * time.Second},
		// The longest the batch's operations on it need.
		{twice, 5 * time.Second},
		{known, 2 * time.Second},
		{swept, time.Hour},
	} {
		got, err := client.PExpireTime(ctx, tc.key).Result()
		if err != nil {
			t.Fatal(err)
		}
		// The field says when the hash expires, and so does its TTL.
		field, err := client.HGet(ctx, tc.key, ExpiryField).Result()
		if err != nil {
			t.Fatal(err)
		}
		want := t0.Add(tc.want).Truncate(time.Millisecond)
		if ends := time.UnixMilli(got.Milliseconds()); ends.After(want.Add(500*time.Millisecond)) || ends.Before(want) {
			t.Errorf("%s expires at %v, want about %v", tc.key, ends, want)
		}
		if field != fmt.Sprint(got.Milliseconds()) {
			t.Errorf("%s: expiry field %s, expires at %d ms", tc.key, field, got.Milliseconds())
		}
	}
	for key, want := range map[string][]string{noTTL: {"a/b", stranger}, swept: {"a/b"}} {
		got, err := BucketFields(ctx, client, key)
		slices.Sort(got)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("buckets of %s = %q, %v; want %q", key, got, err, want)
		}
	}
}

// TestOpsOutliveTheirCallers checks that a batch keeps its operations until
// it is done with them, although its callers were answered and left: a
// client without ContextTimeoutEnabled keeps reading past the batch's
// deadline (and one with retries would write the operations again), so an
// operation reused for another request meanwhile would send that request
// in this batch's name. Not parallel: it looks at an op after its caller
// released it, which the pool must not hand out meanwhile.
func TestOpsOutliveTheirCallers(t *testing.T) {
	srv := redistest.Start(t)
	client := srv.NewClient(t, func(o *redis.Options) {
		o.ContextTimeoutEnabled, o.ReadTimeout, o.MaxRetries, o.DialerRetries = false, 10*time.Second, -1, 1
	})
	s := New(client, WithTimeout(50*time.Millisecond))
	lim := bucket.Limit{Capacity: 10, RefillPerSecond: 1}
	// The pool's connection is made and greeted before the pause: only
	// the batch's read is left to hang.
	if _, err := s.Take(t.Context(), bucket.Request{Subject: "warm-up", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 1}}}); err != nil {
		t.Fatal(err)
	}
	o := s.takeOp(bucket.Request{Subject: "s", Charges: []bucket.Charge{{Bucket: "b", Limit: lim, Cost: 1}}})
	arg, key := strings.Clone(o.arg), strings.Clone(o.keys[0])
	if err := srv.Pause(0); err != nil {
		t.Fatal(err)
	}
	// Answered as unknown half a timeout after the batch's deadline, while
	// the client still reads.
	if _, err := s.do(t.Context(), o); !errors.Is(err, bucket.ErrOutcomeUnknown) {
		t.Fatalf("do on a paused server: %v, want an unknown outcome", err)
	}
	// Under s.mu, which the batch takes to answer before it lets go.
	s.mu.Lock()
	refs, gotArg, gotKey := o.refs.Load(), o.arg, o.keys[0]
	s.mu.Unlock()
	if refs != 1 || gotArg != arg || gotKey != key {
		t.Errorf("after its caller left, the op has %d references, argument %q and key %q; want 1 (the batch's), %q and %q", refs, gotArg, gotKey, arg, key)
	}
	if err := srv.Resume(); err != nil {
		t.Fatal(err)
	}
	// The reply comes; the batch lets the op go before its goroutine
	// counts it answered (under s.mu).
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.Lock()
		inFlight := s.inFlight
		s.mu.Unlock()
		if inFlight == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the batch is still in flight 10 s after the server resumed")
		}
		time.Sleep(time.Millisecond)
	}
	if refs := o.refs.Load(); refs != 0 || o.arg != "" || len(o.keys) != 0 {
		t.Errorf("once its batch is done, the op has %d references, argument %q and keys %q; want it released and blank", refs, o.arg, o.keys)
	}
	// The batch applied the request it was given.
	if err := client.HGet(t.Context(), key, field("s", "b")).Err(); err != nil {
		t.Errorf("the batch's write: %v", err)
	}
}
