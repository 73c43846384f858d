package breaker_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/bucket/breaker"
	"github.com/connectlimit/connectlimit/bucket/buckettest"
	"github.com/connectlimit/connectlimit/bucket/memstore"
)

// TestMain fails the package's tests if any leaves a goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestContract(t *testing.T) {
	t.Parallel()
	buckettest.Run(t, func(t *testing.T, clock *buckettest.Clock) bucket.Store {
		return newBreaker(t, newMemstore(t, clock))
	})
}

// newMemstore returns a memstore on clock, closed with the test.
func newMemstore(t *testing.T, clock *buckettest.Clock) *memstore.Store {
	t.Helper()
	s := memstore.New(memstore.WithClock(clock.Now))
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestLeaseContract(t *testing.T) {
	t.Parallel()
	buckettest.RunLeases(t, func(t *testing.T, clock *buckettest.Clock) bucket.LeaseStore {
		return newBreaker(t, newMemstore(t, clock))
	})
}

// newBreaker returns a Breaker around store, closed with the test.
func newBreaker(t *testing.T, store bucket.Store, opts ...breaker.Option) *breaker.Breaker {
	t.Helper()
	b := breaker.New(store, opts...)
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// faultyStore is a memstore that fails on demand: while fail is set, every
// call returns it without touching the buckets, and while hang is set,
// every call waits for its context to end and returns an outcome-unknown
// error, like a store that stopped answering. It counts the calls it gets.
type faultyStore struct {
	*memstore.Store
	mu    sync.Mutex
	fail  error
	hang  bool
	calls atomic.Int64
	// lastSubject is the subject of the last Take.
	lastSubject atomic.Pointer[string]
}

func newFaultyStore(t *testing.T) *faultyStore {
	t.Helper()
	s := memstore.New(memstore.WithSweepInterval(0))
	t.Cleanup(func() { _ = s.Close() })
	return &faultyStore{Store: s}
}

// set makes every call fail with err (nil: succeed), or hang.
func (f *faultyStore) set(err error, hang bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail, f.hang = err, hang
}

func (f *faultyStore) fault(ctx context.Context) error {
	f.calls.Add(1)
	f.mu.Lock()
	err, hang := f.fail, f.hang
	f.mu.Unlock()
	if hang {
		<-ctx.Done()
		return fmt.Errorf("faulty: no reply: %w: %w", bucket.ErrOutcomeUnknown, ctx.Err())
	}
	return err
}

func (f *faultyStore) Take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	f.lastSubject.Store(&req.Subject)
	if err := f.fault(ctx); err != nil {
		return bucket.Decision{}, err
	}
	return f.Store.Take(ctx, req)
}

func (f *faultyStore) Acquire(ctx context.Context, req bucket.LeaseRequest) (bucket.LeaseDecision, error) {
	if err := f.fault(ctx); err != nil {
		return bucket.LeaseDecision{}, err
	}
	return f.Store.Acquire(ctx, req)
}

func (f *faultyStore) Release(ctx context.Context, subject, name, id string) error {
	if err := f.fault(ctx); err != nil {
		return err
	}
	return f.Store.Release(ctx, subject, name, id)
}

var (
	errUnknown = fmt.Errorf("faulty: connection reset: %w", bucket.ErrOutcomeUnknown)
	errRefused = fmt.Errorf("faulty: connection refused: %w", bucket.ErrNotApplied)
	errOpaque  = errors.New("faulty: something broke")
	// errRejected is a store's answer to one request it could not apply,
	// such as a key holding garbage.
	errRejected = fmt.Errorf("faulty: bad value: %w: %w", bucket.ErrNotApplied, bucket.ErrRejected)
	// errQueued is what a store returns when the caller's deadline passed
	// while its call waited for a connection.
	errQueued  = fmt.Errorf("faulty: no connection in time: %w: %w", bucket.ErrNotApplied, context.DeadlineExceeded)
	errTimeout = fmt.Errorf("faulty: no reply in time: %w: %w", bucket.ErrOutcomeUnknown, context.DeadlineExceeded)
)

var validRequest = bucket.Request{Subject: "alice", Charges: []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 1e9, RefillPerSecond: 1}, Cost: 1}}}

// hookLog records the state hook's calls.
type hookLog struct {
	mu     sync.Mutex
	events []string
}

func (h *hookLog) hook(s breaker.State, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, fmt.Sprintf("%v: %v", s, err))
}

func (h *hookLog) get() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.events...)
}

// waitFor polls cond until it holds, failing t after a generous deadline.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10s for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestWhatCounts(t *testing.T) {
	t.Parallel()
	// step is one call: the store fails with err (or not, if nil), and
	// the caller's context is live, canceled or expired; invalid sends a
	// malformed request instead, which the memstore refuses, and deny one
	// the memstore denies.
	type step struct {
		err     error
		ctx     string
		invalid bool
		deny    bool
	}
	unknown := step{err: errUnknown}
	ok := step{}
	for _, tc := range []struct {
		name         string
		steps        []step
		wantState    breaker.State
		wantFailures uint64
	}{
		{
			name:         "opens after exactly the threshold",
			steps:        []step{unknown, unknown},
			wantState:    breaker.StateClosed,
			wantFailures: 2,
		},
		{
			name:         "the threshold-th failure opens it",
			steps:        []step{unknown, unknown, unknown},
			wantState:    breaker.StateOpen,
			wantFailures: 3,
		},
		{
			name:         "a success resets the count",
			steps:        []step{unknown, unknown, ok, unknown, unknown},
			wantState:    breaker.StateClosed,
			wantFailures: 4,
		},
		{
			name:         "a denial is a success",
			steps:        []step{unknown, unknown, {deny: true}, unknown, unknown},
			wantState:    breaker.StateClosed,
			wantFailures: 4,
		},
		{
			name:      "invalid requests do not count",
			steps:     []step{{invalid: true}, {invalid: true}, {invalid: true}, {invalid: true}},
			wantState: breaker.StateClosed,
		},
		{
			name:      "a caller that went away does not count",
			steps:     []step{{err: errUnknown, ctx: "canceled"}, {err: errOpaque, ctx: "canceled"}, {err: errRefused, ctx: "canceled"}, {err: errUnknown, ctx: "canceled"}},
			wantState: breaker.StateClosed,
		},
		{
			name:      "a request the store rejected, healthy, does not count",
			steps:     []step{{err: errRejected}, {err: errRejected}, {err: errRejected}, {err: errRejected}},
			wantState: breaker.StateClosed,
		},
		{
			name:      "a call abandoned in the queue does not count",
			steps:     []step{{err: errQueued, ctx: "expired"}, {err: errQueued, ctx: "expired"}, {err: errQueued, ctx: "expired"}},
			wantState: breaker.StateClosed,
		},
		{
			name:         "a timeout after sending counts",
			steps:        []step{{err: errTimeout, ctx: "expired"}, {err: errTimeout, ctx: "expired"}, {err: errTimeout, ctx: "expired"}},
			wantState:    breaker.StateOpen,
			wantFailures: 3,
		},
		{
			name:         "a refused connection counts",
			steps:        []step{{err: errRefused}, {err: errRefused}, {err: errRefused}},
			wantState:    breaker.StateOpen,
			wantFailures: 3,
		},
		{
			name:         "an error that says nothing counts",
			steps:        []step{{err: errOpaque}, {err: errOpaque}, {err: errOpaque}},
			wantState:    breaker.StateOpen,
			wantFailures: 3,
		},
		{
			name:         "errors that do not count do not break a run",
			steps:        []step{unknown, {invalid: true}, {err: errQueued, ctx: "expired"}, unknown, {err: errUnknown, ctx: "canceled"}, unknown},
			wantState:    breaker.StateOpen,
			wantFailures: 3,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := newFaultyStore(t)
			var hooks hookLog
			b := newBreaker(t, store, breaker.WithThreshold(3), breaker.WithProbeInterval(time.Hour), breaker.WithStateHook(hooks.hook))
			var last error
			for i, st := range tc.steps {
				ctx, cancel := context.WithCancel(t.Context())
				if st.ctx == "expired" {
					cancel()
					ctx, cancel = context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
				}
				if st.ctx == "canceled" {
					cancel()
				}
				store.set(st.err, false)
				req := validRequest
				switch {
				case st.invalid:
					req.Subject = ""
				case st.deny:
					req.Charges = []bucket.Charge{{Bucket: "b", Limit: bucket.Limit{Capacity: 1, RefillPerSecond: 1}, Cost: 2}}
				}
				d, err := b.Take(ctx, req)
				cancel()
				if st.err != nil && !errors.Is(err, st.err) {
					t.Fatalf("step %d: err = %v, want the store's %v", i, err, st.err)
				}
				if st.deny && (err != nil || d.Allowed) {
					t.Fatalf("step %d: %+v, %v; want a denial", i, d, err)
				}
				if st.err != nil {
					last = st.err
				}
			}
			if got := b.State(); got != tc.wantState {
				t.Fatalf("State = %v, want %v", got, tc.wantState)
			}
			wantOpens, wantHooks := uint64(0), []string(nil)
			if tc.wantState == breaker.StateOpen {
				wantOpens, wantHooks = 1, []string{fmt.Sprintf("open: %v", last)}
			}
			if got, want := b.Stats(), (breaker.Stats{Opens: wantOpens, Failures: tc.wantFailures}); got != want {
				t.Fatalf("Stats = %+v, want %+v", got, want)
			}
			if got := hooks.get(); fmt.Sprint(got) != fmt.Sprint(wantHooks) {
				t.Fatalf("hook calls %q, want %q", got, wantHooks)
			}
		})
	}
}

// open returns a Breaker around store that opened after two failures of
// err, with the given probe interval.
func open(t *testing.T, store *faultyStore, err error, interval time.Duration, opts ...breaker.Option) *breaker.Breaker {
	t.Helper()
	b := newBreaker(t, store, append([]breaker.Option{breaker.WithThreshold(2), breaker.WithProbeInterval(interval)}, opts...)...)
	store.set(err, false)
	for range 2 {
		if _, got := b.Take(t.Context(), validRequest); !errors.Is(got, err) {
			t.Fatalf("Take: %v, want %v", got, err)
		}
	}
	if s := b.State(); s != breaker.StateOpen {
		t.Fatalf("after two failures: %v, want open", s)
	}
	return b
}

func TestOpenAnswersWithoutTheStore(t *testing.T) {
	t.Parallel()
	store := newFaultyStore(t)
	b := open(t, store, errUnknown, time.Hour)
	// Were a call to reach the store, it would hang until its context
	// ended, 10s from now.
	store.set(nil, true)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	before := store.calls.Load()
	const calls = 100
	start := time.Now()
	for range calls {
		_, err := b.Take(ctx, validRequest)
		checkRefused(t, "Take", err)
		_, err = b.Acquire(ctx, bucket.LeaseRequest{Subject: "alice", Name: "gen", Limit: 1, ID: "x", TTL: time.Minute})
		checkRefused(t, "Acquire", err)
		checkRefused(t, "Release", b.Release(ctx, "alice", "gen", "x"))
	}
	if elapsed := time.Since(start); elapsed > 50*time.Millisecond {
		t.Fatalf("%d refused calls took %v, want under 50ms in all", 3*calls, elapsed)
	}
	if got := store.calls.Load() - before; got != 0 {
		t.Fatalf("the store got %d calls while the breaker was open, want 0", got)
	}
	if got := b.Stats(); got.Rejected != 3*calls || got.Failures != 2 || got.Opens != 1 {
		t.Fatalf("Stats = %+v, want 300 rejected, 2 failures, 1 open", got)
	}
}

// checkRefused fails t unless err is an open breaker's refusal.
func checkRefused(t *testing.T, op string, err error) {
	t.Helper()
	if !errors.Is(err, bucket.ErrNotApplied) || !errors.Is(err, bucket.ErrUnavailable) || bucket.MayHaveApplied(err) {
		t.Fatalf("%s: err = %v, want one wrapping ErrNotApplied and ErrUnavailable", op, err)
	}
	if errors.Is(err, bucket.ErrOutcomeUnknown) {
		t.Fatalf("%s: err = %v wraps the cause's ErrOutcomeUnknown", op, err)
	}
	if msg := err.Error(); !strings.Contains(msg, "breaker") || !strings.Contains(msg, errUnknown.Error()) {
		t.Fatalf("%s: err = %q, want it to name the breaker and the failure %q", op, msg, errUnknown)
	}
}

func TestProbeClosesWhenStoreRecovers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		// The store stays down for a few probes, failing with err or
		// hanging (each probe then times out after the interval).
		err  error
		hang bool
	}{
		{name: "failing store", err: errUnknown},
		{name: "hanging store", hang: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := newFaultyStore(t)
			var hooks hookLog
			b := open(t, store, errUnknown, 2*time.Millisecond, breaker.WithStateHook(hooks.hook))
			store.set(tc.err, tc.hang)
			probed := store.calls.Load()
			waitFor(t, "three probes", func() bool { return store.calls.Load() >= probed+3 })
			if s := b.State(); s != breaker.StateOpen {
				t.Fatalf("after failed probes: %v, want open", s)
			}
			if got := *store.lastSubject.Load(); got != breaker.ProbeSubject {
				t.Fatalf("the probe took from subject %q, want %q", got, breaker.ProbeSubject)
			}
			store.set(nil, false)
			waitFor(t, "the probe to close the breaker", func() bool { return b.State() == breaker.StateClosed })
			if _, err := b.Take(t.Context(), validRequest); err != nil {
				t.Fatalf("Take after recovery: %v", err)
			}
			if got := b.Stats(); got.Opens != 1 || got.Closes != 1 || got.Failures != 2 {
				t.Fatalf("Stats = %+v, want 1 open, 1 close, 2 failures", got)
			}
			want := []string{"open: " + errUnknown.Error(), "closed: " + errUnknown.Error()}
			if got := hooks.get(); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("hook calls %q, want %q", got, want)
			}
		})
	}
}

func TestReopens(t *testing.T) {
	t.Parallel()
	store := newFaultyStore(t)
	var hooks hookLog
	b := newBreaker(t, store, breaker.WithThreshold(1), breaker.WithProbeInterval(time.Millisecond), breaker.WithStateHook(hooks.hook))
	var want []string
	for i, err := range []error{errUnknown, errRefused, errOpaque} {
		store.set(err, false)
		if _, got := b.Take(t.Context(), validRequest); !errors.Is(got, err) {
			t.Fatalf("round %d: Take: %v, want %v", i, got, err)
		}
		_, got := b.Take(t.Context(), validRequest)
		if !errors.Is(got, bucket.ErrUnavailable) || !strings.Contains(got.Error(), err.Error()) {
			t.Fatalf("round %d: Take while open: %v, want a refusal naming %v", i, got, err)
		}
		store.set(nil, false)
		waitFor(t, "the probe to close the breaker", func() bool { return b.State() == breaker.StateClosed })
		want = append(want, "open: "+err.Error(), "closed: "+err.Error())
	}
	if got := b.Stats(); got.Opens != 3 || got.Closes != 3 || got.Failures != 3 || got.Rejected != 3 {
		t.Fatalf("Stats = %+v, want 3 opens, 3 closes, 3 failures, 3 rejected", got)
	}
	if got := hooks.get(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("hook calls %q, want %q", got, want)
	}
}

// TestCloseStopsProbe checks goroutines, so it does not run in parallel
// with other tests.
func TestCloseStopsProbe(t *testing.T) {
	store := newFaultyStore(t)
	before := goleak.IgnoreCurrent()
	var hooks hookLog
	b := breaker.New(store, breaker.WithThreshold(1), breaker.WithProbeInterval(time.Millisecond), breaker.WithStateHook(hooks.hook))
	// Closed, the breaker runs no goroutine.
	for range 10 {
		if _, err := b.Take(t.Context(), validRequest); err != nil {
			t.Fatal(err)
		}
	}
	if err := goleak.Find(before); err != nil {
		t.Fatalf("while closed: %v", err)
	}
	// Open, it runs the probe, which hangs on the store.
	store.set(nil, true)
	ctx, cancel := context.WithTimeout(t.Context(), time.Millisecond)
	defer cancel()
	if _, err := b.Take(ctx, validRequest); !errors.Is(err, bucket.ErrOutcomeUnknown) {
		t.Fatalf("Take: %v, want a lost reply", err)
	}
	if s := b.State(); s != breaker.StateOpen {
		t.Fatalf("State = %v, want open", s)
	}
	probed := store.calls.Load()
	waitFor(t, "a probe", func() bool { return store.calls.Load() > probed })
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	goleak.VerifyNone(t, before)
	// After Close, nothing probes, so the breaker stays open: calls are
	// refused without reaching the store, even once it has recovered.
	store.set(nil, false)
	probed = store.calls.Load()
	for range 5 {
		if _, err := b.Take(t.Context(), validRequest); !errors.Is(err, bucket.ErrUnavailable) {
			t.Fatalf("Take after Close: %v, want a refusal", err)
		}
	}
	if got := store.calls.Load() - probed; got != 0 {
		t.Fatalf("the store got %d calls after Close, want 0", got)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	cause := fmt.Sprintf("faulty: no reply: %v: %v", bucket.ErrOutcomeUnknown, context.DeadlineExceeded)
	if got, want := hooks.get(), []string{"open: " + cause}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("hook calls %q, want %q", got, want)
	}
	if got, want := b.Stats(), (breaker.Stats{Opens: 1, Rejected: 5, Failures: 1}); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}
}

// TestOpenAfterClose checks goroutines, so it does not run in parallel
// with other tests.
func TestOpenAfterClose(t *testing.T) {
	store := newFaultyStore(t)
	before := goleak.IgnoreCurrent()
	var hooks hookLog
	b := breaker.New(store, breaker.WithThreshold(2), breaker.WithProbeInterval(time.Millisecond), breaker.WithStateHook(hooks.hook))
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	// A closed breaker still works after Close, and still opens.
	if _, err := b.Take(t.Context(), validRequest); err != nil {
		t.Fatalf("Take after Close: %v", err)
	}
	store.set(errRefused, false)
	for range 2 {
		if _, err := b.Take(t.Context(), validRequest); !errors.Is(err, errRefused) {
			t.Fatalf("Take after Close: %v, want the store's error", err)
		}
	}
	if s := b.State(); s != breaker.StateOpen {
		t.Fatalf("State = %v, want open", s)
	}
	// But it starts no probe.
	goleak.VerifyNone(t, before)
	if got, want := hooks.get(), []string{"open: " + errRefused.Error()}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("hook calls %q, want %q", got, want)
	}
}

func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	store := newFaultyStore(t)
	var hooks hookLog
	b := newBreaker(t, store, breaker.WithThreshold(3), breaker.WithProbeInterval(time.Millisecond), breaker.WithStateHook(hooks.hook))
	var wg sync.WaitGroup
	stop := make(chan struct{})
	// The store flips between failing and working while callers hammer it.
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if i%2 == 0 {
				store.set(errUnknown, false)
			} else {
				store.set(nil, false)
			}
		}
	})
	for range 8 {
		wg.Go(func() {
			for range 2000 {
				_, _ = b.Take(t.Context(), validRequest)
				_ = b.State()
				_ = b.Stats()
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	close(stop)
	wg.Wait()
	store.set(nil, false)
	waitFor(t, "the breaker to close", func() bool { return b.State() == breaker.StateClosed })
	s := b.Stats()
	if s.Opens != s.Closes {
		t.Fatalf("Stats = %+v: closed, but opens and closes differ", s)
	}
	events := hooks.get()
	if uint64(len(events)) != s.Opens+s.Closes {
		t.Fatalf("%d hook calls for %d opens and %d closes", len(events), s.Opens, s.Closes)
	}
	for i, e := range events {
		if want := []string{"open", "closed"}[i%2]; !strings.HasPrefix(e, want+":") {
			t.Fatalf("hook call %d is %q, want %s: the calls must alternate", i, e, want)
		}
	}
}

// storeOnly hides every method of a store but Take.
type storeOnly struct{ bucket.Store }

func TestWrappedStoreKinds(t *testing.T) {
	t.Parallel()
	ms := memstore.New(memstore.WithSweepInterval(0))
	t.Cleanup(func() { _ = ms.Close() })
	if b := newBreaker(t, ms); !b.InProcess() || !bucket.IsInProcess(b) {
		t.Fatal("a breaker around a memstore is not in process")
	}
	b := newBreaker(t, storeOnly{ms})
	if bucket.IsInProcess(b) {
		t.Fatal("a breaker around a store that is not InProcess reports InProcess")
	}
	if _, err := b.Take(t.Context(), validRequest); err != nil {
		t.Fatal(err)
	}
	_, err := b.Acquire(t.Context(), bucket.LeaseRequest{Subject: "alice", Name: "gen", Limit: 1, ID: "x", TTL: time.Minute})
	if !errors.Is(err, errors.ErrUnsupported) || !errors.Is(err, bucket.ErrNotApplied) {
		t.Fatalf("Acquire on a store without leases: %v, want ErrUnsupported and ErrNotApplied", err)
	}
	if err := b.Release(t.Context(), "alice", "gen", "x"); !errors.Is(err, errors.ErrUnsupported) {
		t.Fatalf("Release on a store without leases: %v, want ErrUnsupported", err)
	}
	if got := b.Stats(); got != (breaker.Stats{}) {
		t.Fatalf("Stats = %+v, want zero: unsupported calls are no failures", got)
	}
}

func TestOptionDefaults(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name          string
		opts          []breaker.Option
		wantThreshold int
	}{
		{name: "default", wantThreshold: breaker.DefaultThreshold},
		{name: "zero threshold opens on the first failure", opts: []breaker.Option{breaker.WithThreshold(0)}, wantThreshold: 1},
		{name: "negative threshold", opts: []breaker.Option{breaker.WithThreshold(-3)}, wantThreshold: 1},
		{name: "zero interval and nil hook keep the defaults", opts: []breaker.Option{breaker.WithThreshold(2), breaker.WithProbeInterval(0), breaker.WithStateHook(nil)}, wantThreshold: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := newFaultyStore(t)
			store.set(errUnknown, false)
			b := newBreaker(t, store, tc.opts...)
			for i := 1; i <= tc.wantThreshold; i++ {
				if s := b.State(); s != breaker.StateClosed {
					t.Fatalf("open after %d failures, want %d", i-1, tc.wantThreshold)
				}
				_, _ = b.Take(t.Context(), validRequest)
			}
			if s := b.State(); s != breaker.StateOpen {
				t.Fatalf("closed after %d failures", tc.wantThreshold)
			}
		})
	}
}

func TestStateString(t *testing.T) {
	t.Parallel()
	for s, want := range map[breaker.State]string{breaker.StateClosed: "closed", breaker.StateOpen: "open", 7: "State(7)"} {
		if got := s.String(); got != want {
			t.Errorf("State(%d).String() = %q, want %q", int32(s), got, want)
		}
	}
}

func BenchmarkTake(b *testing.B) {
	ms := memstore.New(memstore.WithSweepInterval(0))
	b.Cleanup(func() { _ = ms.Close() })
	for _, bc := range []struct {
		name  string
		store bucket.Store
	}{
		{"memstore", ms},
		{"breaker", breaker.New(ms)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := bc.store.Take(context.Background(), validRequest); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// TestOverlappingFailuresCountOnce fails many calls that are in flight
// together, as a store that coalesces calls fails a whole batch: that is
// one failure. Calls that start after it are counted again.
func TestOverlappingFailuresCountOnce(t *testing.T) {
	t.Parallel()
	store := newFaultyStore(t)
	b := breaker.New(store, breaker.WithThreshold(3))
	t.Cleanup(func() { _ = b.Close() })
	store.set(nil, true) // every call hangs until its context ends
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	for range 100 {
		wg.Go(func() { _, _ = b.Take(ctx, validRequest) })
	}
	wg.Wait()
	if st := b.Stats(); b.State() != breaker.StateClosed || st.Failures != 100 {
		t.Fatalf("after 100 overlapping failures: %v, %+v; want closed, with 100 failures seen", b.State(), st)
	}
	// Two more, one after the other: the run reaches the threshold.
	store.set(errUnknown, false)
	for i := range 2 {
		if _, err := b.Take(t.Context(), validRequest); err == nil {
			t.Fatalf("call %d succeeded", i)
		}
	}
	if b.State() != breaker.StateOpen {
		t.Fatalf("after one overlapping run and two sequential failures: %v, want open", b.State())
	}
}
