package interceptor

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

// lease is a concurrency slot held by a call, renewed in the background
// until released.
type lease struct {
	req  bucket.LeaseRequest
	stop chan struct{}
	done chan struct{}
}

// acquireLease takes a slot of conc for the call. It returns the error to
// send: a denial, a misconfiguration, or a store failure under FailClosed.
func (c *call) acquireLease(ctx context.Context, conc costmap.Concurrency) error {
	ls := c.ic.leases
	if ls == nil {
		c.ic.cfg.logger.ErrorContext(ctx, "connectlimit: procedure has a concurrency limit but the store cannot limit concurrency",
			"procedure", c.procedure, "limit", conc.Name)
		return connect.NewError(connect.CodeInternal, errors.New("connectlimit: rate limit misconfigured for this procedure"))
	}
	req := bucket.LeaseRequest{Subject: c.subject, Name: conc.Name, Limit: conc.Limit, ID: c.callID(), TTL: conc.Lease}
	actx, cancel := context.WithTimeout(ctx, c.ic.cfg.timeout)
	d, err := ls.Acquire(actx, req)
	cancel()
	if err != nil {
		return c.ic.storeFailed(ctx, c.procedure, c.subject, "acquire lease", err)
	}
	if !d.Acquired {
		return concurrencyDenial(c.subject, conc, d)
	}
	l := &lease{req: req, stop: make(chan struct{}), done: make(chan struct{})}
	c.lease = l
	go c.renew(context.WithoutCancel(ctx), l)
	return nil
}

// renew keeps the lease alive while the call runs, so that only a server
// that stopped (crashed) loses its slots to expiry.
func (c *call) renew(ctx context.Context, l *lease) {
	defer close(l.done)
	t := time.NewTicker(max(l.req.TTL/3, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			rctx, cancel := context.WithTimeout(ctx, c.ic.cfg.timeout)
			d, err := c.ic.leases.Acquire(rctx, l.req)
			cancel()
			if err != nil || !d.Acquired {
				c.ic.cfg.logger.WarnContext(ctx, "connectlimit: cannot renew a concurrency lease",
					"procedure", c.procedure, "subject", c.subject, "limit", l.req.Name, "error", err)
			}
		}
	}
}

// releaseLease frees the call's slot, if it holds one.
func (c *call) releaseLease(ctx context.Context) {
	l := c.lease
	if l == nil {
		return
	}
	close(l.stop)
	<-l.done
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.ic.cfg.timeout)
	defer cancel()
	if err := c.ic.leases.Release(rctx, l.req.Subject, l.req.Name, l.req.ID); err != nil {
		c.ic.cfg.logger.WarnContext(ctx, "connectlimit: cannot release a concurrency lease; it expires on its own",
			"procedure", c.procedure, "subject", c.subject, "limit", l.req.Name, "lease", l.req.TTL, "error", err)
	}
}

// concurrencyDenial is the error for a call refused by a concurrency limit.
// It has no RetryInfo: when a slot frees up depends on other calls.
func concurrencyDenial(subject string, conc costmap.Concurrency, d bucket.LeaseDecision) *connect.Error {
	err := connect.NewError(connect.CodeResourceExhausted,
		fmt.Errorf("connectlimit: concurrency limit %q reached: %d of %d calls already in flight", conc.Name, d.InUse, d.Limit))
	if detail, e := connect.NewErrorDetail(&errdetails.QuotaFailure{Violations: []*errdetails.QuotaFailure_Violation{{
		Subject:     subject,
		Description: fmt.Sprintf("concurrency limit %q: at most %d calls at once", conc.Name, d.Limit),
		QuotaId:     conc.Name,
		QuotaValue:  int64(d.Limit),
	}}}); e == nil {
		err.AddDetail(detail)
	}
	return err
}
