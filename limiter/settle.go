package limiter

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// settler applies, in the background, what could not reach the store when
// a call needed it: settlements, the resolution of requests whose outcome
// was unknown, post-paid bills, and lease releases. It holds two kinds of
// entries:
//
//   - jobs: a call's chain of steps that must be applied in order, each
//     with its own request ID, resent with that ID until it succeeds (so a
//     lost reply never charges twice);
//   - balances: what callers owe or are owed from requests that certainly
//     never reached the store, merged per subject and sent under a fresh ID
//     when the store is back, so an outage costs one entry per caller
//     rather than one per call.
//
// A worker goroutine runs while there are entries: it tries every entry,
// then waits (50ms, doubling to 5s while nothing succeeds). An entry older
// than the retry duration, or refused as invalid, is dropped, logged and
// counted; one entry never blocks the others.
type settler struct {
	back     *backend
	retryFor time.Duration
	max      int
	idWindow time.Duration
	logger   *slog.Logger
	now      func() time.Time
	drops    *rateLimiter

	mu       sync.Mutex
	jobs     []*job
	balances map[string]*balance // by subject
	entries  int                 // steps of queued jobs plus balances
	running  bool
	closed   bool
	stop     chan struct{}
	done     chan struct{} // closed by the worker when it exits after stop

	retried atomic.Uint64
	dropped atomic.Uint64
}

// job is a call's chain of background steps, applied in order.
type job struct {
	procedure string
	steps     []step // guarded by settler.mu
	queued    bool   // in settler.jobs
}

// step is one background store call: an adjustment with an ID, or a lease
// release.
type step struct {
	req     bucket.Request
	release *leaseRef
	since   time.Time
}

// leaseRef names a lease to release.
type leaseRef struct {
	store             bucket.LeaseStore
	subject, name, id string
}

// balance is what one subject owes (positive) or is owed (negative) per
// bucket, from requests that certainly never reached the store.
type balance struct {
	procedure string // of the latest call merged in, for logs
	charges   []bucket.Charge
	calls     int
	since     time.Time
}

func newSettler(back *backend, cfg config, idWindow time.Duration) *settler {
	return &settler{
		back: back, retryFor: cfg.settleFor, max: cfg.settleQueue, idWindow: idWindow,
		logger: cfg.logger, now: cfg.now, drops: newRateLimiter(cfg.logEvery),
		balances: map[string]*balance{},
		stop:     make(chan struct{}), done: make(chan struct{}),
	}
}

func (s *settler) newJob(procedure string) *job { return &job{procedure: procedure} }

// push appends st to j and queues j. cause is why it could not be applied
// at once.
func (s *settler) push(ctx context.Context, j *job, st step, cause error) {
	s.mu.Lock()
	if s.closed || s.entries >= s.max {
		why := "the retry queue is full"
		if s.closed {
			why = "the interceptor is closed"
		}
		s.mu.Unlock()
		s.drop(ctx, j.procedure, st, why, cause)
		return
	}
	st.since = s.now()
	j.steps = append(j.steps, st)
	s.entries++
	if !j.queued {
		j.queued = true
		s.jobs = append(s.jobs, j)
	}
	s.startLocked()
	s.mu.Unlock()
	s.retried.Add(1)
}

// owe merges req, which certainly did not reach the store, into its
// subject's balance.
func (s *settler) owe(ctx context.Context, procedure string, req bucket.Request, cause error) {
	s.mu.Lock()
	b, ok := s.balances[req.Subject]
	if !ok && (s.closed || s.entries >= s.max) {
		why := "the retry queue is full"
		if s.closed {
			why = "the interceptor is closed"
		}
		s.mu.Unlock()
		s.drop(ctx, procedure, step{req: req}, why, cause)
		return
	}
	if !ok {
		b = &balance{since: s.now()}
		s.balances[req.Subject] = b
		s.entries++
	}
	b.add(procedure, req.Charges, 1)
	s.startLocked()
	s.mu.Unlock()
	s.retried.Add(1)
}

func (b *balance) add(procedure string, charges []bucket.Charge, calls int) {
	b.procedure = procedure
	b.calls += calls
	for _, c := range charges {
		i := slices.IndexFunc(b.charges, func(have bucket.Charge) bool { return have.Bucket == c.Bucket })
		if i < 0 {
			b.charges = append(b.charges, c)
			continue
		}
		b.charges[i].Limit = c.Limit // the latest limit of the caller's tier
		b.charges[i].Cost += c.Cost
	}
}

// startLocked starts the worker if it is not running. The caller holds
// s.mu.
func (s *settler) startLocked() {
	if !s.running && !s.closed {
		s.running = true
		go s.run()
	}
}

func (s *settler) run() {
	backoff := 50 * time.Millisecond
	for {
		progress := s.pass(false)
		s.mu.Lock()
		if s.entries == 0 {
			s.running = false
			if s.closed {
				close(s.done) // close is waiting for this worker
			}
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		if progress {
			backoff = 50 * time.Millisecond
		} else {
			backoff = min(2*backoff, 5*time.Second)
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-s.stop:
			t.Stop()
			s.pass(true)
			close(s.done)
			return
		}
	}
}

// pass tries every entry once and reports whether any succeeded. With
// final, whatever still fails is dropped.
func (s *settler) pass(final bool) bool {
	progress := false
	s.mu.Lock()
	jobs := slices.Clone(s.jobs)
	subjects := make([]string, 0, len(s.balances))
	for subject := range s.balances {
		subjects = append(subjects, subject)
	}
	s.mu.Unlock()
	for _, j := range jobs {
		if s.runJob(j, final) {
			progress = true
		}
	}
	for _, subject := range subjects {
		if s.payBalance(subject, final) {
			progress = true
		}
	}
	return progress
}

// runJob applies j's steps in order until one fails.
func (s *settler) runJob(j *job, final bool) bool {
	progress := false
	for {
		s.mu.Lock()
		if len(j.steps) == 0 {
			s.unqueueLocked(j)
			s.mu.Unlock()
			return progress
		}
		st := j.steps[0]
		s.mu.Unlock()
		if s.now().Sub(st.since) > s.retryFor {
			s.dropJob(j, "retries ran out", errors.New("not applied within the settle retry duration"))
			return progress
		}
		err := s.attempt(st)
		switch {
		case err == nil:
			progress = true
			s.mu.Lock()
			j.steps = j.steps[1:]
			s.entries--
			s.mu.Unlock()
		case errors.Is(err, bucket.ErrInvalidRequest):
			s.mu.Lock()
			j.steps = j.steps[1:]
			s.entries--
			s.mu.Unlock()
			s.drop(context.Background(), j.procedure, st, "the store refused it as invalid", err)
		case final:
			s.dropJob(j, "the interceptor was closed", err)
			return progress
		default:
			return progress
		}
	}
}

// unqueueLocked removes an empty job from the queue. The caller holds s.mu.
func (s *settler) unqueueLocked(j *job) {
	if j.queued {
		j.queued = false
		s.jobs = slices.DeleteFunc(s.jobs, func(q *job) bool { return q == j })
	}
}

// dropJob drops every step left in j: the later steps depend on the
// earlier ones.
func (s *settler) dropJob(j *job, why string, cause error) {
	s.mu.Lock()
	steps := j.steps
	j.steps = nil
	s.entries -= len(steps)
	s.unqueueLocked(j)
	s.mu.Unlock()
	for _, st := range steps {
		s.drop(context.Background(), j.procedure, st, why, cause)
	}
}

// payBalance sends what subject's balance holds now under a fresh ID. The
// balance stays in the queue meanwhile, so that calls settling during the
// attempt merge into it; once the store has it, what was sent is taken off.
func (s *settler) payBalance(subject string, final bool) bool {
	s.mu.Lock()
	b, ok := s.balances[subject]
	if !ok {
		s.mu.Unlock()
		return false
	}
	charges := slices.DeleteFunc(slices.Clone(b.charges), func(c bucket.Charge) bool { return c.Cost == 0 })
	since, procedure := b.since, b.procedure
	if len(charges) == 0 {
		s.removeBalanceLocked(subject)
		s.mu.Unlock()
		return false
	}
	s.mu.Unlock()
	req := bucket.Request{Subject: subject, Charges: charges, Mode: bucket.ModeAdjust, ID: randomID() + ".b", IDWindow: s.idWindow}
	if s.now().Sub(since) > s.retryFor {
		s.takeOff(subject, charges)
		s.drop(context.Background(), procedure, step{req: req}, "retries ran out", errors.New("not applied within the settle retry duration"))
		return false
	}
	err := s.attempt(step{req: req})
	switch {
	case err == nil:
		s.takeOff(subject, charges)
		return true
	case errors.Is(err, bucket.ErrInvalidRequest) || final:
		s.takeOff(subject, charges)
		why := "the store refused it as invalid"
		if final && !errors.Is(err, bucket.ErrInvalidRequest) {
			why = "the interceptor was closed"
		}
		s.drop(context.Background(), procedure, step{req: req}, why, err)
		return false
	case bucket.MayHaveApplied(err):
		// It may have been applied: only a resend with this ID may follow.
		s.takeOff(subject, charges)
		s.push(context.Background(), s.newJob(procedure), step{req: req}, err)
		return false
	default:
		return false // certainly not applied: the balance keeps it
	}
}

// takeOff subtracts charges, sent (or given up on) under their own ID, from
// subject's balance, and removes the balance once it holds nothing.
func (s *settler) takeOff(subject string, charges []bucket.Charge) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.balances[subject]
	if !ok {
		return
	}
	for _, c := range charges {
		c.Cost = -c.Cost
		b.add(b.procedure, []bucket.Charge{c}, 0)
	}
	if !slices.ContainsFunc(b.charges, func(c bucket.Charge) bool { return c.Cost != 0 }) {
		s.removeBalanceLocked(subject)
	}
}

// removeBalanceLocked removes subject's balance. The caller holds s.mu.
func (s *settler) removeBalanceLocked(subject string) {
	if _, ok := s.balances[subject]; ok {
		delete(s.balances, subject)
		s.entries--
	}
}

func (s *settler) attempt(st step) error {
	ctx := context.Background()
	if st.release != nil {
		r := st.release
		return s.back.release(ctx, r.store, r.subject, r.name, r.id)
	}
	_, err := s.back.take(ctx, st.req)
	return err
}

// drop gives up on st, counting and logging it (at most once per log
// interval with its amounts; the lines between are counted).
func (s *settler) drop(ctx context.Context, procedure string, st step, why string, cause error) {
	s.dropped.Add(1)
	ok, suppressed := s.drops.allow()
	if !ok {
		return
	}
	attrs := []any{"procedure", procedure}
	if st.release != nil {
		attrs = append(attrs, "subject", st.release.subject, "lease", st.release.name, "lease_id", st.release.id)
	} else {
		amounts := make(map[string]float64, len(st.req.Charges))
		for _, c := range st.req.Charges {
			amounts[c.Bucket] = c.Cost
		}
		attrs = append(attrs, "subject", st.req.Subject, "settle_id", st.req.ID, "amounts", amounts)
	}
	attrs = append(attrs, "error", cause, "dropped_not_logged", suppressed)
	s.logger.ErrorContext(ctx, "connectlimit: settlement dropped: "+why, attrs...)
}

// close stops taking entries, gives those queued one last attempt, and
// waits for the worker until ctx is done.
func (s *settler) close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	running := s.running
	close(s.stop)
	s.mu.Unlock()
	if !running {
		return nil
	}
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func randomID() string {
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// rateLimiter lets one event through per interval and counts the others.
type rateLimiter struct {
	every      time.Duration
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func newRateLimiter(every time.Duration) *rateLimiter { return &rateLimiter{every: every} }

// allow reports whether an event may be logged now and, if so, how many
// were suppressed since the last one.
func (r *rateLimiter) allow() (bool, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if !r.last.IsZero() && now.Sub(r.last) < r.every {
		r.suppressed++
		return false, 0
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	return true, n
}
