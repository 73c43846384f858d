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
	reply, err := batchScript.Run(t.Context(), client, keys, args...).Slice()
	if err != nil {
		t.Fatal(err)
	}
	// A bucket request's reply has the present (1 s) and each bucket as
	// it was: "-" when full, else its stored value.
	wantReplies := []string{
		"[1 1000000 -]",
		"[0 1000000 -200000023]",
		"[1 1000000 -]",
		"[2 1000000 -200000023]",
		"[1 1000000 -200000023]",
		"[1 1000000 -200000023 -150000022 -]",
		"ERR connectlimit batch.lua: malformed bucket value at key r:{a}, field bad",
		"[1 1]",
		"[0 1]",
		"[0 0]",
	}
	got := make([]string, len(reply))
	for i, r := range reply {
		got[i] = fmt.Sprint(r)
	}
	if !slices.Equal(got, wantReplies) {
		t.Fatalf("replies:\n%q\nwant\n%q", got, wantReplies)
	}
	if _, ok := reply[6].(redis.Error); !ok {
		t.Fatalf("reply 6 is a %T, want a redis.Error", reply[6])
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
	// stored; bad is as it was.
	want := map[string]string{"b": "-200000023", "c": "-150000022", "bad": "x"}
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
				var wantKeys []string
				wantArgs := []any{"now"}
				for _, j := range tc.want[i] {
					wantKeys = append(wantKeys, ops[j].keys...)
					wantArgs = append(wantArgs, ops[j].arg)
				}
				if !slices.Equal(g.keys, wantKeys) || !slices.Equal(g.args, wantArgs) {
					t.Errorf("group %d: keys %v args %v, want %v and %v", i, g.keys, g.args, wantKeys, wantArgs)
				}
			}
		})
	}
}

// TestBatchScriptRaisesTTLOncePerBatch checks the TTL batch.lua leaves on
// group hashes on the server's clock, raised once per batch: set on a hash
// the batch creates (found missing, or emptied by the sweep, or perhaps
// emptied), raised and never lowered on one that has a TTL, left alone on
// one that has none (made persistent by hand), and the longest any
// operation of the batch needs; with one command per hash, but for a hash
// the batch deleted fields of, where PTTL follows when PEXPIRE GT changed
// nothing.
func TestBatchScriptRaisesTTLOncePerBatch(t *testing.T) {
	t.Parallel()
	client := redistest.Start(t).NewClient(t)
	ctx := t.Context()
	const (
		created = "x:{g/1}"
		short   = "x:{g/2}"
		long    = "x:{g/3}"
		noTTL   = "x:{g/4}"
		twice   = "x:{g/5}"
		// All four of swept's buckets are full by their class: the sweep
		// of 4 samples deletes them all, and so the hash, which the write
		// creates again; emptied's one bucket too.
		swept   = "x:{g/6}"
		emptied = "x:{g/7}"
	)
	// A stranger's bucket that is not full (E far ahead), so that no sweep
	// deletes it; and stale ones, full (E = 1 µs, class 0).
	const stranger, debt, stale = "other/b", "9999999999999999923", "100"
	setup := map[string][]any{
		short:   {stranger, debt},
		long:    {stranger, debt},
		noTTL:   {stranger, debt},
		swept:   {"o1/b", stale, "o2/b", stale, "o3/b", stale, "o4/b", stale},
		emptied: {"o1/b", stale},
	}
	for key, fields := range setup {
		if err := client.HSet(ctx, key, fields...).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for key, d := range map[string]time.Duration{short: 100 * time.Millisecond, long: time.Hour, swept: time.Hour, emptied: time.Hour} {
		if err := client.PExpire(ctx, key, d).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := client.ConfigResetStat(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	keys := []string{created, short, long, noTTL, twice, twice, swept, emptied}
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
	reply, err := batchScript.Run(ctx, client, keys, args...).Slice()
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range reply {
		if got := fmt.Sprint(r); !strings.HasPrefix(got, "[1 ") {
			t.Fatalf("reply %d: %v, want applied", i, got)
		}
	}
	// One TTL command per hash the batch wrote to (PEXPIRE for created,
	// twice and emptied, PEXPIRE GT for the others), and for swept, which
	// the batch deleted fields of, PTTL and PEXPIRE after GT.
	stats, err := client.Info(ctx, "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	for cmd, want := range map[string]int{"time": 1, "pexpire": 8, "pttl": 1} {
		m := regexp.MustCompile(`(?m)^cmdstat_` + cmd + `:calls=(\d+),`).FindStringSubmatch(stats)
		if m == nil || m[1] != fmt.Sprint(want) {
			t.Errorf("%s calls: %v, want %d", cmd, m, want)
		}
	}
	for _, tc := range []struct {
		key  string
		want time.Duration
	}{
		{created, 2 * time.Second},
		{short, 2 * time.Second},
		{long, time.Hour},
		{noTTL, -1},
		// The longest the batch's operations on it need.
		{twice, 5 * time.Second},
		{swept, 2 * time.Second},
		{emptied, 2 * time.Second},
	} {
		got, err := client.PTTL(ctx, tc.key).Result()
		if err != nil {
			t.Fatal(err)
		}
		if got > tc.want+2*time.Millisecond || got < tc.want-500*time.Millisecond {
			t.Errorf("PTTL %s = %v, want about %v", tc.key, got, tc.want)
		}
	}
	for key, want := range map[string][]string{noTTL: {"a/b", stranger}, swept: {"a/b"}, emptied: {"a/b"}} {
		got, err := client.HKeys(ctx, key).Result()
		slices.Sort(got)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("HKEYS %s = %q, %v; want %q", key, got, err, want)
		}
	}
}
