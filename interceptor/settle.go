package interceptor

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
)

// settler retries, in the background, settlements that did not reach the
// store. Each settlement carries an ID, so a retry after a lost reply is not
// applied twice.
type settler struct {
	store    bucket.Store
	timeout  time.Duration
	retryFor time.Duration
	logger   *slog.Logger

	queue   chan settlement
	retried atomic.Uint64
	dropped atomic.Uint64

	mu     sync.Mutex
	closed bool
	done   chan struct{}
	stop   chan struct{}
}

type settlement struct {
	procedure string
	req       bucket.Request
	since     time.Time
}

func newSettler(store bucket.Store, cfg config) *settler {
	s := &settler{
		store: store, timeout: cfg.timeout, retryFor: cfg.settleFor, logger: cfg.logger,
		queue: make(chan settlement, cfg.settleQueue), done: make(chan struct{}), stop: make(chan struct{}),
	}
	go s.run()
	return s
}

// enqueue queues a settlement whose first attempt failed with err.
func (s *settler) enqueue(ctx context.Context, procedure string, req bucket.Request, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		select {
		case s.queue <- settlement{procedure: procedure, req: req, since: time.Now()}:
			s.retried.Add(1)
			s.logger.WarnContext(ctx, "connectlimit: settlement failed; retrying in the background",
				settleAttrs(procedure, req, err)...)
			return
		default:
		}
	}
	s.drop(ctx, procedure, req, "the retry queue is full or closed", err)
}

func (s *settler) drop(ctx context.Context, procedure string, req bucket.Request, why string, err error) {
	s.dropped.Add(1)
	s.logger.ErrorContext(ctx, "connectlimit: settlement dropped: "+why, settleAttrs(procedure, req, err)...)
}

func settleAttrs(procedure string, req bucket.Request, err error) []any {
	amounts := make(map[string]float64, len(req.Charges))
	for _, c := range req.Charges {
		amounts[c.Bucket] = c.Cost
	}
	return []any{"procedure", procedure, "subject", req.Subject, "settle_id", req.ID, "amounts", amounts, "error", err}
}

func (s *settler) run() {
	defer close(s.done)
	for {
		var job settlement
		select {
		case job = <-s.queue:
		case <-s.stop:
			// Drain what is left, one attempt each.
			for {
				select {
				case job = <-s.queue:
					if err := s.attempt(job); err != nil {
						s.drop(context.Background(), job.procedure, job.req, "the interceptor was closed", err)
					}
				default:
					return
				}
			}
		}
		s.retry(job)
	}
}

// retry attempts a settlement with exponential backoff until it succeeds,
// retryFor has passed since it first failed, or the settler is closed.
func (s *settler) retry(job settlement) {
	backoff := 50 * time.Millisecond
	for {
		err := s.attempt(job)
		if err == nil {
			return
		}
		if time.Since(job.since)+backoff > s.retryFor {
			s.drop(context.Background(), job.procedure, job.req, "retries ran out", err)
			return
		}
		select {
		case <-time.After(backoff):
		case <-s.stop:
			if err := s.attempt(job); err != nil {
				s.drop(context.Background(), job.procedure, job.req, "the interceptor was closed", err)
			}
			return
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (s *settler) attempt(job settlement) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	_, err := s.store.Take(ctx, job.req)
	return err
}

// close stops taking settlements, gives those queued one last attempt, and
// waits for the worker until ctx is done.
func (s *settler) close(ctx context.Context) error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.stop)
	}
	s.mu.Unlock()
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
