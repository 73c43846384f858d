package limiter

import (
	"context"
	"errors"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

// lease is a concurrency slot held by a call, renewed in the background
// until released.
type lease struct {
	store bucket.LeaseStore // the store's leases, or the local store's
	local bool
	req   bucket.LeaseRequest
	stop  chan struct{}
	done  chan struct{}
}

// acquireLease takes a slot of conc for the call. It returns the error
// that refuses the call: a denial, a misconfiguration, or unavailable.
//
// The lease's ID is the call's, so a lost reply is harmless: Acquire is
// idempotent, and a lease whose outcome is unknown is released in the
// background, so one hiccup never holds a slot for the whole lease.
func (a *Call) acquireLease(ctx context.Context, conc costmap.Concurrency) error {
	back := a.ic.back
	if back.leases == nil {
		a.ic.cfg.logger.ErrorContext(ctx, "connectlimit: procedure has a concurrency limit but the store cannot limit concurrency",
			"procedure", a.procedure, "limit", conc.Name)
		return internalError("rate limit misconfigured for this procedure")
	}
	req := bucket.LeaseRequest{Subject: a.subject, Name: conc.Name, Limit: conc.Limit, ID: a.id, TTL: conc.Lease}
	d, err := back.acquire(ctx, req)
	if err == nil {
		if !d.Acquired {
			return concurrencyDenial(a.subject, conc.Name, d)
		}
		a.holdLease(ctx, back.leases, false, req)
		return nil
	}
	if errors.Is(err, bucket.ErrInvalidRequest) {
		a.ic.cfg.logger.ErrorContext(ctx, "connectlimit: store refused a lease as invalid", "procedure", a.procedure, "subject", a.subject, "error", err)
		return internalError("cannot charge this call")
	}
	if bucket.MayHaveApplied(err) {
		// The slot may be held: give it back as soon as the store answers.
		a.ic.settler.push(ctx, a.ic.settler.newJob(a.procedure),
			step{release: &leaseRef{store: back.leases, subject: req.Subject, name: req.Name, id: req.ID}}, err)
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return contextError(ctxErr)
	}
	back.log.storeFailed(ctx, "acquire lease", a.procedure, a.subject, a.policy, err)
	switch a.policy {
	case FailOpen:
		back.allowedWithoutStore.Add(1)
		return nil
	case FailClosed:
		back.rejectedUnavailable.Add(1)
		return unavailableError()
	}
	if back.localLeases == nil {
		// NewInterceptor checks that a local store exists; one without
		// leases lets the call through, as FailOpen would.
		back.allowedWithoutStore.Add(1)
		return nil
	}
	local := req
	local.Limit = back.scaleConcurrency(req.Limit)
	ld, lerr := back.localLeases.Acquire(ctx, local)
	if lerr != nil {
		return contextError(lerr)
	}
	back.localDecisions.Add(1)
	if !ld.Acquired {
		return concurrencyDenial(a.subject, conc.Name, ld)
	}
	a.holdLease(ctx, back.localLeases, true, local)
	return nil
}

func (a *Call) holdLease(ctx context.Context, store bucket.LeaseStore, local bool, req bucket.LeaseRequest) {
	l := &lease{store: store, local: local, req: req, stop: make(chan struct{}), done: make(chan struct{})}
	a.lease = l
	go a.renew(context.WithoutCancel(ctx), l)
}

// renew keeps the lease alive while the call runs, so that only a server
// that stopped (crashed) loses its slots to expiry.
func (a *Call) renew(ctx context.Context, l *lease) {
	defer close(l.done)
	t := time.NewTicker(max(l.req.TTL/3, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			rctx, cancel := context.WithTimeout(ctx, a.ic.back.wait)
			d, err := l.store.Acquire(rctx, l.req)
			cancel()
			switch {
			case err != nil:
				a.ic.back.log.storeFailed(ctx, "renew lease", a.procedure, a.subject, a.policy, err)
			case !d.Acquired:
				a.ic.cfg.logger.WarnContext(ctx, "connectlimit: a concurrency lease expired before it was renewed; the call goes on without its slot",
					"procedure", a.procedure, "subject", a.subject, "limit", l.req.Name, "in_use", d.InUse)
			}
		}
	}
}

// releaseLease frees the call's slot, if it holds one. A release that
// fails is retried in the background: the slot would otherwise stay taken
// until its lease runs out.
func (a *Call) releaseLease(ctx context.Context) {
	l := a.lease
	if l == nil {
		return
	}
	a.lease = nil
	close(l.stop)
	<-l.done
	ctx = context.WithoutCancel(ctx)
	err := a.ic.back.release(ctx, l.store, l.req.Subject, l.req.Name, l.req.ID)
	if err == nil || l.local {
		return
	}
	a.ic.settler.push(ctx, a.ic.settler.newJob(a.procedure),
		step{release: &leaseRef{store: l.store, subject: l.req.Subject, name: l.req.Name, id: l.req.ID}}, err)
}
