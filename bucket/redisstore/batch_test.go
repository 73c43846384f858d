package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"reflect"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// hungTimeout is the store timeout of tests that hold batches behind a
// paused server: far longer than any pause they make.
const hungTimeout = 30 * time.Second

// scriptStats and evalStats match the lines of INFO commandstats that
// count script calls: EVAL and EVALSHA, or EVAL alone.
var (
	scriptStats = regexp.MustCompile(`(?m)^cmdstat_(?:eval|evalsha):calls=(\d+),`)
	evalStats   = regexp.MustCompile(`(?m)^cmdstat_eval:calls=(\d+),`)
)

// scriptCalls returns how many EVAL and EVALSHA commands the servers
// behind c ran since their statistics were last reset (see resetStats):
// the script calls of the stores that use them.
func scriptCalls(t *testing.T, c redis.UniversalClient) int64 {
	t.Helper()
	return countCalls(t, c, scriptStats)
}

// countCalls sums the calls of the commands that stats matches over the
// servers behind c.
func countCalls(t *testing.T, c redis.UniversalClient, stats *regexp.Regexp) int64 {
	t.Helper()
	var mu sync.Mutex
	var n int64
	count := func(ctx context.Context, c *redis.Client) error {
		info, err := c.Info(ctx, "commandstats").Result()
		if err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		for _, m := range stats.FindAllStringSubmatch(info, -1) {
			v, err := strconv.ParseInt(m[1], 10, 64)
			if err != nil {
				return err
			}
			n += v
		}
		return nil
	}
	var err error
	switch c := c.(type) {
	case *redis.ClusterClient:
		err = c.ForEachMaster(t.Context(), count)
	case *redis.Client:
		err = count(t.Context(), c)
	default:
		t.Fatalf("scriptCalls: unsupported client %T", c)
	}
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// resetStats resets the command statistics of the servers behind c.
func resetStats(t *testing.T, c redis.UniversalClient) {
	t.Helper()
	var err error
	switch c := c.(type) {
	case *redis.ClusterClient:
		err = c.ForEachMaster(t.Context(), func(ctx context.Context, c *redis.Client) error { return c.ConfigResetStat(ctx).Err() })
	case *redis.Client:
		err = c.ConfigResetStat(t.Context()).Err()
	default:
		t.Fatalf("resetStats: unsupported client %T", c)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// waitQueued waits until s has queued operations waiting and inFlight
// batches in flight.
func waitQueued(t *testing.T, s *redisstore.Store, queued, inFlight int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		q, f := redisstore.Queued(s)
		if q == queued && f == inFlight {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5 s, %d operations queued and %d batches in flight; want %d and %d", q, f, queued, inFlight)
		}
		time.Sleep(time.Millisecond)
	}
}

// plug returns a request that takes one token from a bucket of its own,
// which no test reads, to occupy one of a Store's in-flight slots.
func plug() bucket.Request {
	return bucket.Request{Subject: "plug", Charges: []bucket.Charge{charge("plug", 1e12, 1, 1)}}
}

// hang pauses srv and fills both in-flight slots of s with a batch of one
// plug each, so that s queues every later call until the returned resume
// is called. resume waits for the plugs, and runs at the end of the test if
// it was not called before.
func hang(t *testing.T, srv *redistest.Server, s *redisstore.Store) (resume func()) {
	t.Helper()
	if err := srv.Pause(0); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() {
			if _, err := s.Take(context.Background(), plug()); err != nil {
				t.Errorf("plug: %v", err)
			}
		})
		waitQueued(t, s, 0, i+1)
	}
	var once sync.Once
	resume = func() {
		once.Do(func() {
			if err := srv.Resume(); err != nil {
				t.Error(err)
			}
			wg.Wait()
		})
	}
	t.Cleanup(resume)
	return resume
}

// lineUp runs calls on s as one batch, in order: behind a hung server, it
// starts each call once the previous one is queued, then resumes the
// server and waits for them all. It returns how many script calls the
// server ran meanwhile, the two plugs of hang included.
func lineUp(t *testing.T, srv *redistest.Server, client *redis.Client, s *redisstore.Store, calls []func()) int64 {
	t.Helper()
	take(t, s, plug()) // loads the script, so that no call needs EVAL
	resetStats(t, client)
	resume := hang(t, srv, s)
	var wg sync.WaitGroup
	for i, call := range calls {
		wg.Go(call)
		waitQueued(t, s, i+1, 2)
	}
	resume()
	wg.Wait()
	return scriptCalls(t, client)
}

// TestCoalescing takes one token 200 times at once from a bucket of 50,
// on a stopped clock: exactly 50 takes are allowed however they are
// batched, and far fewer than 200 script calls decide them.
func TestCoalescing(t *testing.T) {
	t.Parallel()
	const callers, capacity = 200, 50
	for _, tc := range []struct {
		name string
		opts []redisstore.Option
		// hung makes the calls queue behind a hung server, so that the
		// batches are known: the first two calls alone, then the rest
		// by maxBatch.
		hung bool
		// wantCalls is the number of script calls when hung, and
		// otherwise the most allowed.
		wantCalls int64
	}{
		{name: "Burst", wantCalls: callers / 2},
		{name: "BehindHungServer", hung: true, wantCalls: 2 + 1},
		{name: "MaxBatch50", opts: []redisstore.Option{redisstore.WithMaxBatch(50)}, hung: true, wantCalls: 2 + 4},
		{name: "MaxBatch1", opts: []redisstore.Option{redisstore.WithMaxBatch(1)}, hung: true, wantCalls: callers},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := redistest.Start(t)
			client := srv.NewClient(t, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries = true, -1 })
			opts := append([]redisstore.Option{redisstore.WithClock(buckettest.NewClock(time.Unix(1e9, 0)).Now), redisstore.WithTimeout(hungTimeout)}, tc.opts...)
			s := redisstore.New(client, opts...)
			req := bucket.Request{Subject: "user:hot", Charges: []bucket.Charge{charge("b", capacity, 1, 1)}}
			take(t, s, bucket.Request{Subject: "warmup", Charges: []bucket.Charge{charge("b", 1, 1, 0)}}) // loads the script
			resetStats(t, client)

			var allowed atomic.Int64
			var wg sync.WaitGroup
			start := make(chan struct{})
			if tc.hung {
				if err := srv.Pause(0); err != nil {
					t.Fatal(err)
				}
				close(start)
			}
			for range callers {
				wg.Go(func() {
					<-start
					d, err := s.Take(t.Context(), req)
					if err != nil {
						t.Error(err)
						return
					}
					if d.Allowed {
						allowed.Add(1)
					}
				})
			}
			if tc.hung {
				waitQueued(t, s, callers-2, 2)
				if err := srv.Resume(); err != nil {
					t.Fatal(err)
				}
			} else {
				close(start)
			}
			wg.Wait()
			calls := scriptCalls(t, client)
			t.Logf("%d decisions in %d script calls (%.3f per decision)", callers, calls, float64(calls)/callers)
			if got := allowed.Load(); got != capacity {
				t.Errorf("allowed %d takes, want exactly %d", got, capacity)
			}
			switch {
			case tc.hung && calls != tc.wantCalls:
				t.Errorf("%d script calls, want %d", calls, tc.wantCalls)
			case !tc.hung && calls > tc.wantCalls:
				t.Errorf("%d script calls for %d concurrent takes, want at most %d", calls, callers, tc.wantCalls)
			}
		})
	}
}

// step is one call of a scripted sequence: a Take, an Acquire or a
// Release, whichever has a subject.
type step struct {
	take    bucket.Request
	acquire bucket.LeaseRequest
	// release is subject, name and id.
	release [3]string
}

// outcome is what a step returned, in a form reflect.DeepEqual compares.
type outcome struct {
	Decision bucket.Decision
	Lease    bucket.LeaseDecision
	Err      string
}

func (st step) run(ctx context.Context, s *redisstore.Store) (outcome, error) {
	var o outcome
	var err error
	switch {
	case st.take.Subject != "":
		o.Decision, err = s.Take(ctx, st.take)
	case st.acquire.Subject != "":
		o.Lease, err = s.Acquire(ctx, st.acquire)
	default:
		err = s.Release(ctx, st.release[0], st.release[1], st.release[2])
	}
	if err != nil {
		o.Err = err.Error()
	}
	return o, err
}

func (st step) String() string {
	switch {
	case st.take.Subject != "":
		return fmt.Sprintf("%s %s id %q %v", st.take.Mode, st.take.Subject, st.take.ID, st.take.Charges)
	case st.acquire.Subject != "":
		return fmt.Sprintf("acquire %s/%s %s", st.acquire.Subject, st.acquire.Name, st.acquire.ID)
	default:
		return fmt.Sprintf("release %s/%s %s", st.release[0], st.release[1], st.release[2])
	}
}

// snapshot returns every key under prefix, without the prefix, with its
// value: a string as is, a hash as its fields and values, a sorted set as
// its members and scores.
func snapshot(t *testing.T, c *redis.Client, prefix string) map[string]string {
	t.Helper()
	keys, err := c.Keys(t.Context(), prefix+":*").Result()
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]string, len(keys))
	for _, k := range keys {
		var v string
		switch typ := c.Type(t.Context(), k).Val(); typ {
		case "string":
			v = c.Get(t.Context(), k).Val()
		case "zset":
			v = fmt.Sprint(c.ZRangeWithScores(t.Context(), k, 0, -1).Val())
		case "hash":
			// fmt prints a map with its keys sorted.
			v = fmt.Sprint(c.HGetAll(t.Context(), k).Val())
		case "list":
			v = fmt.Sprint(c.LRange(t.Context(), k, 0, -1).Val())
		default:
			t.Fatalf("key %s is a %s", k, typ)
		}
		m[strings.TrimPrefix(k, prefix)] = v
	}
	return m
}

// TestMixedBatch runs a sequence of every kind of operation as one batch
// on one Store and one call at a time on another: their answers, and what
// they leave in Redis, are the same.
func TestMixedBatch(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	client := srv.NewClient(t)
	clock := buckettest.NewClock(time.Unix(1e9, 0))
	batched := redisstore.New(client, redisstore.WithKeyPrefix("batched"), redisstore.WithClock(clock.Now), redisstore.WithTimeout(hungTimeout))
	sequential := newStore(client, redisstore.WithKeyPrefix("sequential"), redisstore.WithClock(clock.Now))

	a, b, c := charge("a", 10, 1, 4), charge("b", 5, 1, 2), charge("c", 3, 1, 3)
	with := func(ch bucket.Charge, cost float64) bucket.Charge { ch.Cost = cost; return ch }
	lease := func(id string) bucket.LeaseRequest {
		return bucket.LeaseRequest{Subject: "alice", Name: "gen", Limit: 1, ID: id, TTL: time.Minute}
	}
	steps := []step{
		{take: bucket.Request{Subject: "alice", Charges: []bucket.Charge{a, b}}},
		// a holds 6: denied, and b is not charged either.
		{take: bucket.Request{Subject: "alice", Charges: []bucket.Charge{with(a, 7), with(b, 1)}}},
		{take: bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, ID: "settle-1", Charges: []bucket.Charge{with(a, -2)}}},
		{take: bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, ID: "settle-1", Charges: []bucket.Charge{with(a, -2)}}},
		{take: bucket.Request{Subject: "alice", Charges: []bucket.Charge{with(a, 0), with(b, 0)}}},
		{take: bucket.Request{Subject: "alice", ID: "call-1", Charges: []bucket.Charge{with(a, 8)}}},
		{take: bucket.Request{Subject: "alice", ID: "call-1", Charges: []bucket.Charge{with(a, 8)}}},
		{take: bucket.Request{Subject: "alice", ID: "call-2", IDWindow: time.Minute, Charges: []bucket.Charge{with(b, 3), c}}},
		// A denied take with an ID records nothing; its retry does.
		{take: bucket.Request{Subject: "alice", ID: "call-3", Charges: []bucket.Charge{with(c, 1)}}},
		{take: bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, ID: "call-3", Charges: []bucket.Charge{with(c, 1)}}},
		{take: bucket.Request{Subject: "bob", Charges: []bucket.Charge{with(a, 10)}}},
		{acquire: lease("lease-1")},
		{acquire: lease("lease-2")},
		{release: [3]string{"alice", "gen", "lease-1"}},
		{acquire: lease("lease-2")},
		{acquire: lease("lease-2")},
		{take: bucket.Request{Subject: "alice", Charges: []bucket.Charge{with(b, 1)}}},
		{take: bucket.Request{Subject: "alice", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{with(b, 2), with(c, -10)}}},
		{take: bucket.Request{Subject: "alice", Charges: []bucket.Charge{with(a, 0), with(b, 0), with(c, 0)}}},
		{take: bucket.Request{Subject: "bob", Charges: []bucket.Charge{with(a, 0)}}},
	}

	got := make([]outcome, len(steps))
	calls := make([]func(), len(steps))
	for i, st := range steps {
		calls[i] = func() {
			var err error
			if got[i], err = st.run(t.Context(), batched); err != nil {
				t.Errorf("batched step %d (%v): %v", i, st, err)
			}
		}
	}
	if n := lineUp(t, srv, client, batched, calls); n != 3 {
		t.Errorf("%d script calls, want 3: two plugs and one batch", n)
	}
	for i, st := range steps {
		want, err := st.run(t.Context(), sequential)
		if err != nil {
			t.Fatalf("sequential step %d (%v): %v", i, st, err)
		}
		if !reflect.DeepEqual(got[i], want) {
			t.Errorf("step %d (%v):\nbatched    %+v\nsequential %+v", i, st, got[i], want)
		}
	}
	// The sequence meant something: a denial, duplicates, a lease denied
	// and one renewed.
	if got[1].Decision.Allowed || !got[3].Decision.Duplicate || !got[6].Decision.Duplicate || got[12].Lease.Acquired || !got[15].Lease.Acquired {
		t.Errorf("unexpected outcomes: %+v", got)
	}
	st, ss := snapshot(t, client, "batched"), snapshot(t, client, "sequential")
	delete(st, strings.TrimPrefix(redisstore.GroupKey("batched", "plug"), "batched"))
	if !reflect.DeepEqual(st, ss) {
		t.Errorf("keys after the batch:\n%v\nafter sequential calls:\n%v", st, ss)
	}
}

// TestPerOperationFailure puts operations on unreadable keys in one batch
// with good ones: each of the bad ones fails alone, wrapping
// bucket.ErrNotApplied and writing nothing, and the others are applied.
func TestPerOperationFailure(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	client := srv.NewClient(t)
	s := redisstore.New(client, redisstore.WithKeyPrefix("po"), redisstore.WithTimeout(hungTimeout))
	ctx := t.Context()
	alice := redisstore.GroupKey("po", "alice")
	for _, err := range []error{
		client.HSet(ctx, alice, redisstore.Field("alice", "garbage"), "x y z", redisstore.Field("alice", "nan"), "nan").Err(),
		client.RPush(ctx, redisstore.GroupKey("po", "carol"), "x").Err(),
		client.Set(ctx, redisstore.MarkerKey("po", "alice", "bad-marker"), "soon", 0).Err(),
		client.Set(ctx, "po:{alice}~lease:string", "x", 0).Err(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	before := snapshot(t, client, "po")
	good := func(name string) bucket.Charge { return charge(name, 10, 1e-6, 1) }
	rows := []struct {
		step    step
		wantErr string
		// untouched is a bucket of alice's group hash that the failed
		// step would have written.
		untouched string
	}{
		{step: step{take: bucket.Request{Subject: "dave", Charges: []bucket.Charge{good("first")}}}},
		{step: step{take: bucket.Request{Subject: "alice", Charges: []bucket.Charge{good("g1"), good("garbage")}}}, wantErr: "malformed bucket value at key " + alice + ", field " + redisstore.Field("alice", "garbage"), untouched: "g1"},
		{step: step{take: bucket.Request{Subject: "alice", Charges: []bucket.Charge{good("g2"), good("nan")}}}, wantErr: "malformed bucket value at key " + alice + ", field " + redisstore.Field("alice", "nan"), untouched: "g2"},
		{step: step{take: bucket.Request{Subject: "carol", Mode: bucket.ModeAdjust, Charges: []bucket.Charge{good("g3")}}}, wantErr: "WRONGTYPE"},
		{step: step{take: bucket.Request{Subject: "alice", ID: "bad-marker", Charges: []bucket.Charge{good("g4")}}}, wantErr: "malformed id marker value", untouched: "g4"},
		{step: step{take: bucket.Request{Subject: "dave", Charges: []bucket.Charge{good("first")}}}},
		{step: step{acquire: bucket.LeaseRequest{Subject: "alice", Name: "string", Limit: 1, ID: "l", TTL: time.Minute}}, wantErr: "WRONGTYPE"},
		{step: step{acquire: bucket.LeaseRequest{Subject: "alice", Name: "gen", Limit: 1, ID: "l", TTL: time.Minute}}},
		{step: step{release: [3]string{"alice", "string", "l"}}, wantErr: "WRONGTYPE"},
		{step: step{take: bucket.Request{Subject: "bob", Charges: []bucket.Charge{good("first")}}}},
	}
	results := make([]outcome, len(rows))
	errs := make([]error, len(rows))
	calls := make([]func(), len(rows))
	for i, row := range rows {
		calls[i] = func() { results[i], errs[i] = row.step.run(t.Context(), s) }
	}
	if n := lineUp(t, srv, client, s, calls); n != 3 {
		t.Errorf("%d script calls, want 3: two plugs and one batch", n)
	}
	for i, row := range rows {
		err := errs[i]
		if row.wantErr == "" {
			if err != nil {
				t.Errorf("step %d (%v): %v", i, row.step, err)
			}
			continue
		}
		var rerr redis.Error
		if !errors.Is(err, bucket.ErrNotApplied) || !errors.Is(err, bucket.ErrRejected) || bucket.MayHaveApplied(err) || !errors.As(err, &rerr) || !strings.Contains(err.Error(), row.wantErr) {
			t.Errorf("step %d (%v): %v; want a Redis error wrapping bucket.ErrNotApplied and bucket.ErrRejected, mentioning %q", i, row.step, err, row.wantErr)
		}
		if row.untouched != "" {
			if ok, err := client.HExists(t.Context(), alice, redisstore.Field("alice", row.untouched)).Result(); err != nil || ok {
				t.Errorf("step %d (%v) failed but wrote bucket %s", i, row.step, row.untouched)
			}
		}
	}
	// The good operations around the bad ones were applied.
	if d := results[5].Decision; !d.Allowed || d.Buckets[0].Remaining != 8 {
		t.Errorf("second take from bucket first: %+v, want allowed with 8 left", d)
	}
	if l := results[7].Lease; !l.Acquired {
		t.Errorf("acquire of a good lease set: %+v, want acquired", l)
	}
	// The bad keys are as they were.
	after := snapshot(t, client, "po")
	for k, v := range before {
		if after[k] != v {
			t.Errorf("key %s changed from %q to %q", k, v, after[k])
		}
	}
}

// TestFailures provokes each kind of failure on a real server and checks
// how Take classifies it.
func TestFailures(t *testing.T) {
	t.Parallel()
	req := bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 1)}}
	recommended := func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries, o.DialerRetries = true, -1, 1 }
	for _, tc := range []struct {
		name      string
		configure func(*redis.Options)
		timeout   time.Duration
		fail      func(*testing.T, *redistest.Server, *redis.Client)
		heal      func(*testing.T, *redistest.Server, *redis.Client)
		// wantNotApplied or else unknown; wantErr is in the chain,
		// and wantMsg in the message.
		wantNotApplied bool
		wantErr        func(error) bool
		wantMsg        string
		// wantTook is the least time Take takes; it always returns
		// well before 5 s.
		wantTook time.Duration
	}{
		{
			name: "Killed", configure: recommended,
			fail:           func(t *testing.T, srv *redistest.Server, _ *redis.Client) { must(t, srv.Kill()) },
			wantNotApplied: true, wantMsg: "connection refused",
			wantErr: func(err error) bool { var oe *net.OpError; return errors.As(err, &oe) && oe.Op == "dial" },
		},
		{
			// go-redis dials in the background and retries a refused
			// dial after 100 ms: the batch's deadline passes first, and
			// a deadline passing proves nothing.
			name: "KilledDialRetries", configure: func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries = true, -1 }, timeout: redisstore.DefaultTimeout,
			fail:    func(t *testing.T, srv *redistest.Server, _ *redis.Client) { must(t, srv.Kill()) },
			wantErr: func(err error) bool { return errors.Is(err, context.DeadlineExceeded) },
		},
		{
			// With retries, the last attempt's error says nothing of
			// the earlier attempts.
			name: "KilledClientRetries", configure: func(o *redis.Options) { o.ContextTimeoutEnabled, o.DialerRetries = true, 1 },
			fail:    func(t *testing.T, srv *redistest.Server, _ *redis.Client) { must(t, srv.Kill()) },
			wantMsg: "connection refused",
		},
		{
			name: "ClientClosed", configure: recommended,
			fail:           func(t *testing.T, _ *redistest.Server, c *redis.Client) { must(t, c.Close()) },
			wantNotApplied: true, wantErr: func(err error) bool { return errors.Is(err, redis.ErrClosed) },
		},
		{
			// Redis refuses the script's first write: nothing is written.
			name: "OutOfMemory", configure: recommended,
			fail: func(t *testing.T, _ *redistest.Server, c *redis.Client) {
				must(t, c.ConfigSet(t.Context(), "maxmemory", "1").Err())
			},
			heal: func(t *testing.T, _ *redistest.Server, c *redis.Client) {
				must(t, c.ConfigSet(t.Context(), "maxmemory", "0").Err())
			},
			wantNotApplied: true, wantMsg: "OOM",
			wantErr: func(err error) bool { var rerr redis.Error; return errors.As(err, &rerr) },
		},
		{
			name: "Hung", configure: recommended, timeout: 300 * time.Millisecond,
			fail:     func(t *testing.T, srv *redistest.Server, _ *redis.Client) { must(t, srv.Pause(0)) },
			heal:     func(t *testing.T, srv *redistest.Server, _ *redis.Client) { must(t, srv.Resume()) },
			wantErr:  timedOut,
			wantTook: 300 * time.Millisecond,
		},
		{
			// The client reads on until its ReadTimeout (3 s), but the
			// store answers its callers half a timeout after the deadline.
			name: "HungIgnoredDeadline", configure: func(o *redis.Options) { o.MaxRetries = -1 }, timeout: 300 * time.Millisecond,
			fail:     func(t *testing.T, srv *redistest.Server, _ *redis.Client) { must(t, srv.Pause(0)) },
			heal:     func(t *testing.T, srv *redistest.Server, _ *redis.Client) { must(t, srv.Resume()) },
			wantErr:  func(err error) bool { return errors.Is(err, context.DeadlineExceeded) },
			wantTook: 450 * time.Millisecond,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := redistest.Start(t)
			client := srv.NewClient(t, tc.configure)
			// s is for the call that fails, with the timeout under test;
			// ok is for the calls around it, on the same keys.
			s, ok := newStore(client, redisstore.WithTimeout(tc.timeout)), newStore(client)
			req := req
			req.ID = "call-1"
			take(t, ok, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 0)}}) // loads the script
			tc.fail(t, srv, client)
			began := time.Now()
			_, err := s.Take(t.Context(), req)
			took := time.Since(began)
			t.Logf("error after %v: %v", took, err)
			if tc.heal != nil {
				tc.heal(t, srv, client)
			}
			wantKind := bucket.ErrOutcomeUnknown
			if tc.wantNotApplied {
				wantKind = bucket.ErrNotApplied
			}
			switch {
			case err == nil:
				t.Fatal("Take succeeded")
			case !errors.Is(err, wantKind) || bucket.MayHaveApplied(err) == tc.wantNotApplied:
				t.Errorf("Take: %v; want an error wrapping %v", err, wantKind)
			case errors.Is(err, bucket.ErrNotApplied) && errors.Is(err, bucket.ErrOutcomeUnknown):
				t.Errorf("Take: %v wraps both ErrNotApplied and ErrOutcomeUnknown", err)
			case !strings.HasPrefix(err.Error(), "redisstore: take: "):
				t.Errorf("Take: %v; want it to start with the store's prefix", err)
			case tc.wantErr != nil && !tc.wantErr(err):
				t.Errorf("Take: %v; the client's error is not in the chain", err)
			case !strings.Contains(err.Error(), tc.wantMsg):
				t.Errorf("Take: %v; want it to mention %q", err, tc.wantMsg)
			case took < tc.wantTook || took > 5*time.Second:
				t.Errorf("Take failed after %v, want from %v to well before 5 s", took, tc.wantTook)
			}
			if tc.heal == nil {
				return
			}
			// Once the server is back, the outcome is known: resent as an
			// adjustment with the same ID, the request is a duplicate if
			// and only if the failed call was applied.
			if tc.wantNotApplied {
				if d := take(t, ok, req); !d.Allowed || d.Duplicate || d.Buckets[0].Remaining != 4 {
					t.Errorf("after the server healed: %+v, want applied afresh with 4 left", d)
				}
				return
			}
			// The hung server runs the script when it wakes up: wait for
			// it, so that the resend comes after it.
			read := bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 0)}}
			deadline := time.Now().Add(5 * time.Second)
			for take(t, ok, read).Buckets[0].Remaining > 4.5 {
				if time.Now().After(deadline) {
					t.Fatal("the request sent to the hung server was never applied")
				}
				time.Sleep(10 * time.Millisecond)
			}
			resend := req
			resend.Mode = bucket.ModeAdjust
			if d := take(t, ok, resend); !d.Duplicate || math.Abs(d.Buckets[0].Remaining-4) > 1e-3 {
				t.Errorf("resent after the server woke up: %+v, want a duplicate with 4 left", d)
			}
		})
	}
}

// timedOut reports whether err says that a deadline passed: the batch's
// context, or the socket deadline the client derived from it.
func timedOut(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestCallerContext checks that a caller's context bounds its own wait and
// nothing else: ended on entry or while queued, the call is never sent;
// ended in flight, the call returns at once with an unknown outcome, and
// the batch goes on.
func TestCallerContext(t *testing.T) {
	t.Parallel()
	read := bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1e-6, 0)}}
	req := bucket.Request{Subject: "alice", ID: "call-1", Charges: []bucket.Charge{charge("b", 5, 1e-6, 2)}}
	t.Run("DoneOnEntry", func(t *testing.T) {
		t.Parallel()
		client := redistest.Start(t).NewClient(t)
		s := newStore(client)
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		resetStats(t, client)
		_, err := s.Take(ctx, req)
		if !errors.Is(err, bucket.ErrNotApplied) || !errors.Is(err, context.Canceled) {
			t.Fatalf("Take with a canceled context: %v; want ErrNotApplied and context.Canceled", err)
		}
		if q, f := redisstore.Queued(s); q != 0 || f != 0 {
			t.Fatalf("%d queued and %d in flight after a canceled Take, want none", q, f)
		}
		if n := scriptCalls(t, client); n != 0 {
			t.Fatalf("%d script calls after a canceled Take, want 0", n)
		}
	})
	t.Run("EndsWhileQueued", func(t *testing.T) {
		t.Parallel()
		srv := redistest.Start(t)
		client := srv.NewClient(t)
		s := redisstore.New(client, redisstore.WithTimeout(hungTimeout))
		take(t, s, read) // loads the script
		resetStats(t, client)
		resume := hang(t, srv, s)
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		_, err := s.Take(ctx, req)
		if !errors.Is(err, bucket.ErrNotApplied) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Take whose context ended in the queue: %v; want ErrNotApplied and context.DeadlineExceeded", err)
		}
		resume()
		if d := take(t, s, read); d.Buckets[0].Remaining != 5 {
			t.Fatalf("after the queued call gave up: %+v, want nothing charged", d)
		}
		// The plugs and the read: the abandoned call was never sent.
		if n := scriptCalls(t, client); n != 3 {
			t.Fatalf("%d script calls, want 3", n)
		}
		if d := take(t, s, req); d.Duplicate || !d.Allowed {
			t.Fatalf("the abandoned request, sent again: %+v, want applied afresh", d)
		}
	})
	t.Run("EndsInFlight", func(t *testing.T) {
		t.Parallel()
		srv := redistest.Start(t)
		client := srv.NewClient(t, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries = true, -1 })
		s := redisstore.New(client, redisstore.WithTimeout(hungTimeout))
		take(t, s, read) // loads the script
		must(t, srv.Pause(0))
		t.Cleanup(func() { _ = srv.Resume() })
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		began := time.Now()
		_, err := s.Take(ctx, req)
		took := time.Since(began)
		if !errors.Is(err, bucket.ErrOutcomeUnknown) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Take whose context ended in flight: %v; want ErrOutcomeUnknown and context.DeadlineExceeded", err)
		}
		if took > 5*time.Second {
			t.Fatalf("Take returned %v after its context ended, want at once (the batch's timeout is %v)", took, hungTimeout)
		}
		if _, f := redisstore.Queued(s); f != 1 {
			t.Fatalf("%d batches in flight after the caller left, want 1: the batch goes on", f)
		}
		must(t, srv.Resume())
		waitQueued(t, s, 0, 0)
		// The batch went on without its caller and was applied.
		if d := take(t, s, req); !d.Duplicate || math.Abs(d.Buckets[0].Remaining-3) > 1e-3 {
			t.Fatalf("the request resent: %+v, want a duplicate with 3 left", d)
		}
	})
}

// TestIdleStoreHasNoGoroutine checks that a Store's goroutines exist only
// while it has batches in flight. It is not parallel, so that no other
// test's Store runs meanwhile.
func TestIdleStoreHasNoGoroutine(t *testing.T) {
	srv := redistest.Start(t)
	s := newStore(srv.NewClient(t, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries = true, -1 }))
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			take(t, s, bucket.Request{Subject: fmt.Sprint("user:", i%5), Charges: []bucket.Charge{charge("b", 100, 1, 1)}})
		})
	}
	wg.Wait()
	// A caller that leaves while its batch hangs.
	must(t, srv.Pause(0))
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Take(ctx, bucket.Request{Subject: "x", Charges: []bucket.Charge{charge("b", 1, 1, 1)}}); !errors.Is(err, bucket.ErrOutcomeUnknown) {
		t.Fatalf("Take on a hung server: %v, want an unknown outcome", err)
	}
	if n := storeGoroutines(); n == 0 {
		t.Fatal("no Store goroutine while a batch is in flight")
	}
	must(t, srv.Resume())
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := storeGoroutines()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d Store goroutines 5 s after the last call:\n%s", n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// storeGoroutines counts the goroutines running a Store method.
func storeGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	n := 0
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "bucket/redisstore.(*Store)") && !strings.Contains(g, "redisstore_test.") {
			n++
		}
	}
	return n
}

// TestMaxBatchOption checks that WithMaxBatch keeps its value in range.
func TestMaxBatchOption(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		n         int
		wantCalls int64
	}{
		// 30 queued calls, by batches of n, plus the two plugs.
		{n: 0, wantCalls: 2 + 1},
		{n: -5, wantCalls: 2 + 1},
		{n: 1, wantCalls: 2 + 30},
		{n: 7, wantCalls: 2 + 5},
		{n: 1 << 30, wantCalls: 2 + 1},
	} {
		t.Run(fmt.Sprint(tc.n), func(t *testing.T) {
			t.Parallel()
			srv := redistest.Start(t)
			client := srv.NewClient(t)
			s := redisstore.New(client, redisstore.WithMaxBatch(tc.n), redisstore.WithTimeout(hungTimeout))
			calls := make([]func(), 30)
			for i := range calls {
				calls[i] = func() { take(t, s, bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 100, 1, 1)}}) }
			}
			if n := lineUp(t, srv, client, s, calls); n != tc.wantCalls {
				t.Fatalf("WithMaxBatch(%d): %d script calls, want %d", tc.n, n, tc.wantCalls)
			}
		})
	}
}

// TestRing runs the contract on a Ring of two servers, which places keys
// by their hash tag: every group hash and marker key is where the Ring
// looks for it, however the subjects were batched.
func TestRing(t *testing.T) {
	t.Parallel()
	a, b := redistest.Start(t), redistest.Start(t)
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": a.Addr(), "b": b.Addr()}})
	t.Cleanup(func() { _ = ring.Close() })
	t.Run("Contract", func(t *testing.T) {
		t.Parallel()
		buckettest.Run(t, contractStores(ring, "ring"))
	})
	t.Run("Leases", func(t *testing.T) {
		t.Parallel()
		buckettest.RunLeases(t, leaseStores(ring, "ring-lease"))
	})
	t.Run("KeysWhereTheRingLooks", func(t *testing.T) {
		t.Parallel()
		s := newStore(ring, redisstore.WithKeyPrefix("placed"))
		const subjects = 40
		var wg sync.WaitGroup
		for i := range 10 * subjects {
			wg.Go(func() {
				take(t, s, bucket.Request{Subject: fmt.Sprint("user:", i%subjects), ID: fmt.Sprint("call-", i), Charges: []bucket.Charge{charge("b", 100, 1, 1)}})
			})
		}
		wg.Wait()
		var onA, onB int
		shardA := a.NewClient(t)
		for i := range 10 * subjects {
			k := redisstore.MarkerKey("placed", fmt.Sprint("user:", i%subjects), fmt.Sprint("call-", i))
			if n, err := ring.Exists(t.Context(), k).Result(); err != nil || n != 1 {
				t.Errorf("the Ring does not find %s: %d, %v", k, n, err)
			}
		}
		for i := range subjects {
			k := redisstore.GroupKey("placed", fmt.Sprint("user:", i))
			if n, err := ring.Exists(t.Context(), k).Result(); err != nil || n != 1 {
				t.Errorf("the Ring does not find %s: %d, %v", k, n, err)
			}
			if shardA.Exists(t.Context(), k).Val() == 1 {
				onA++
			} else {
				onB++
			}
		}
		if onA == 0 || onB == 0 {
			t.Errorf("%d subjects on one shard and %d on the other, want both used", onA, onB)
		}
	})
}

// TestQueuedCallsGetTheirOwnTimeout checks that the timeout runs per batch,
// from the moment it is sent: a call queued behind two batches that hang
// until they time out is sent after them, with a whole timeout of its own,
// and succeeds once the server wakes up, although it waited longer than
// the timeout in all.
func TestQueuedCallsGetTheirOwnTimeout(t *testing.T) {
	t.Parallel()
	const timeout = time.Second
	srv := redistest.Start(t)
	client := srv.NewClient(t, func(o *redis.Options) { o.ContextTimeoutEnabled, o.MaxRetries = true, -1 })
	s := redisstore.New(client, redisstore.WithTimeout(timeout))
	take(t, s, plug()) // loads the script
	must(t, srv.Pause(0))
	t.Cleanup(func() { _ = srv.Resume() })
	began := time.Now()
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() {
			if _, err := s.Take(t.Context(), plug()); !errors.Is(err, bucket.ErrOutcomeUnknown) {
				t.Errorf("a batch on the hung server: %v, want an unknown outcome after the timeout", err)
			}
		})
		waitQueued(t, s, 0, i+1)
	}
	queued := make(chan error, 1)
	go func() {
		_, err := s.Take(t.Context(), bucket.Request{Subject: "alice", Charges: []bucket.Charge{charge("b", 5, 1, 1)}})
		queued <- err
	}()
	waitQueued(t, s, 1, 2)
	// The first batches time out at 1 s and the queued call goes out then,
	// due at 2 s; the server wakes up halfway.
	time.Sleep(timeout + timeout/2 - time.Since(began))
	must(t, srv.Resume())
	if err := <-queued; err != nil {
		t.Fatalf("the call queued behind the hung batches: %v after %v, want success", err, time.Since(began))
	}
	wg.Wait()
	t.Logf("the queued call succeeded %v after it was made, with a timeout of %v", time.Since(began).Round(time.Millisecond), timeout)
}
