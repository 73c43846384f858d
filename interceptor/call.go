package interceptor

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

// call is one limited call in flight: what it reserved, what it has used so
// far, and its concurrency lease.
type call struct {
	ic        *Interceptor
	procedure string
	rule      *costmap.Rule
	tier      *costmap.Tier
	subject   string
	stream    connect.StreamType
	// id is unique per call: the lease's ID and the settlement's
	// idempotency ID. It is made on first use (see callID), since most
	// calls need neither.
	id    string
	lease *lease

	mu sync.Mutex // handlers may call ReportUsage from any goroutine
	// reserved is a private copy of the charges taken so far, nil until
	// the call reserved (or if the store failed open).
	reserved []bucket.Charge
	usage    []float64 // actual usage counted from response messages
	reported []float64 // usage reported by the handler
	// isReported marks the charges the handler reported usage for.
	isReported   []bool
	actualFailed bool // an actual expression failed: keep reservations
	decision     *bucket.Decision
}

func newCall(i *Interceptor, spec connect.Spec, rule *costmap.Rule, tier *costmap.Tier, subject string) *call {
	return &call{ic: i, procedure: spec.Procedure, rule: rule, tier: tier, subject: subject, stream: spec.StreamType}
}

// callID returns the call's unique ID. Only the goroutine running the
// interceptor calls it (to acquire a lease, then to settle).
func (c *call) callID() string {
	if c.id == "" {
		var b [12]byte
		_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
		c.id = base64.RawURLEncoding.EncodeToString(b[:])
	}
	return c.id
}

// perMessage reports whether every received message is charged (client
// and bidi streams) rather than the call once.
func (c *call) perMessage() bool {
	return c.stream == connect.StreamTypeClient || c.stream == connect.StreamTypeBidi
}

// take runs one store request under the store timeout.
func (c *call) take(ctx context.Context, req bucket.Request) (bucket.Decision, error) {
	ctx, cancel := context.WithTimeout(ctx, c.ic.cfg.timeout)
	defer cancel()
	return c.ic.store.Take(ctx, req)
}

// charges evaluates the rule's costs for msg.
func (c *call) charges(msg proto.Message) ([]bucket.Charge, error) {
	charges, err := c.rule.Charges(c.tier, msg)
	if err == nil {
		return charges, nil
	}
	if evalErr := new(costmap.EvalError); errors.As(err, &evalErr) {
		return nil, connect.NewError(connect.CodeInvalidArgument,
			fmt.Errorf("connectlimit: cannot price this request: bucket %q: cost expression %q: %w", evalErr.Bucket, evalErr.Expression, evalErr.Err))
	}
	return nil, connect.NewError(connect.CodeInternal, errors.New("connectlimit: cannot price this request"))
}

// reserve takes the call's estimated cost from every bucket at once. It
// returns the error to send: a denial, a pricing error, or a store failure
// under FailClosed.
func (c *call) reserve(ctx context.Context, msg proto.Message) error {
	charges, err := c.charges(msg)
	if err != nil {
		return err
	}
	d, err := c.take(ctx, bucket.Request{Subject: c.subject, Charges: charges})
	if err != nil {
		return c.ic.storeFailed(ctx, c.procedure, c.subject, "reserve", err)
	}
	if !d.Allowed {
		return DenialError(c.subject, d)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := len(charges)
	c.reserved = slices.Clone(charges)
	// One allocation for both running totals.
	totals := make([]float64, 2*n)
	c.usage, c.reported, c.isReported = totals[:n:n], totals[n:], make([]bool, n)
	c.decision = &d
	return nil
}

// chargeMessage charges one received message of a client or bidi stream.
func (c *call) chargeMessage(ctx context.Context, msg proto.Message) error {
	charges, err := c.charges(msg)
	if err != nil {
		return err
	}
	d, err := c.take(ctx, bucket.Request{Subject: c.subject, Charges: charges})
	if err != nil {
		return c.ic.storeFailed(ctx, c.procedure, c.subject, "charge message", err)
	}
	if !d.Allowed {
		return DenialError(c.subject, d)
	}
	c.mu.Lock()
	c.decision = &d
	c.mu.Unlock()
	return nil
}

// addActual counts the actual usage one response message reports. An
// expression that fails is logged, and the call then keeps its reservation.
func (c *call) addActual(ctx context.Context, msg proto.Message) {
	if !c.rule.Metered() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reserved == nil {
		return
	}
	if err := c.rule.AddActual(msg, c.usage); err != nil {
		c.actualFailed = true
		c.ic.cfg.logger.WarnContext(ctx, "connectlimit: cannot read actual usage; keeping the reservation",
			"procedure", c.procedure, "subject", c.subject, "error", err)
	}
}

// meteredLocked reports whether charge i is settled to its usage.
func (c *call) meteredLocked(i int) bool {
	return c.isReported[i] || (c.rule.MeteredAt(i) && !c.actualFailed)
}

// usedLocked is the usage counted for charge i so far.
func (c *call) usedLocked(i int) float64 {
	used := c.reported[i]
	if c.rule.MeteredAt(i) && !c.actualFailed {
		used += c.usage[i]
	}
	return used
}

// settle applies the difference between the call's final and reserved
// costs, and returns the decision to report in headers. failed says that
// the handler returned an error. A settlement the store does not take is
// queued for a retry.
func (c *call) settle(ctx context.Context, failed bool) *bucket.Decision {
	c.mu.Lock()
	if c.reserved == nil {
		d := c.decision
		c.mu.Unlock()
		return d
	}
	var adjust []bucket.Charge
	for i, ch := range c.reserved {
		final := ch.Cost
		switch {
		case c.meteredLocked(i):
			final = c.usedLocked(i)
		case failed && c.rule.EstimatedAt(i):
			final = 0
		}
		if delta := final - ch.Cost; delta != 0 {
			adjust = append(adjust, bucket.Charge{Bucket: ch.Bucket, Limit: ch.Limit, Cost: delta})
		}
	}
	reserved := c.decision
	c.mu.Unlock()
	if len(adjust) == 0 {
		return reserved
	}
	req := bucket.Request{Subject: c.subject, Charges: adjust, Mode: bucket.ModeAdjust, ID: c.callID()}
	// A caller that went away is still owed its refund.
	d, err := c.take(context.WithoutCancel(ctx), req)
	if err != nil {
		c.ic.settler.enqueue(ctx, c.procedure, req, err)
		return reserved
	}
	return merge(reserved, d)
}

// merge returns base with the states of the buckets in update replaced.
func merge(base *bucket.Decision, update bucket.Decision) *bucket.Decision {
	out := *base
	out.Buckets = slices.Clone(base.Buckets)
	for _, u := range update.Buckets {
		for j := range out.Buckets {
			if out.Buckets[j].Bucket == u.Bucket {
				out.Buckets[j].Remaining, out.Buckets[j].ResetAfter = u.Remaining, u.ResetAfter
			}
		}
	}
	return &out
}

// chargeExcess takes, on a server stream, the usage counted beyond the
// reservation. It returns the error that ends the stream, if any.
func (c *call) chargeExcess(ctx context.Context) error {
	c.mu.Lock()
	var excess []bucket.Charge
	var idx []int
	total := 0.0
	for i, ch := range c.reserved {
		if !c.meteredLocked(i) {
			continue
		}
		if need := c.usedLocked(i) - ch.Cost; need > 0 {
			excess = append(excess, bucket.Charge{Bucket: ch.Bucket, Limit: ch.Limit, Cost: need})
			idx = append(idx, i)
			total += need
		}
	}
	c.mu.Unlock()
	if len(excess) == 0 {
		return nil
	}
	d, err := c.take(ctx, bucket.Request{Subject: c.subject, Charges: excess})
	if err != nil {
		// Fail open: the excess is charged when the stream settles.
		return c.ic.storeFailed(ctx, c.procedure, c.subject, "charge stream excess", err)
	}
	if !d.Allowed {
		if total <= c.ic.cfg.overdraft && !d.OverCapacity() {
			return nil // within the overdraft: settled into debt at the end
		}
		return DenialError(c.subject, d)
	}
	c.mu.Lock()
	for k, i := range idx {
		c.reserved[i].Cost += excess[k].Cost
	}
	c.decision = merge(c.decision, d)
	c.mu.Unlock()
	return nil
}

// currentDecision returns the latest decision, for headers.
func (c *call) currentDecision() *bucket.Decision {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.decision
}

type callKey struct{}

func withCall(ctx context.Context, c *call) context.Context {
	return context.WithValue(ctx, callKey{}, c)
}

// ReportUsage records, from inside a handler, that the current call used
// tokens from a bucket its procedure charges, for costs the response does
// not carry (or in addition to what its actual expression reads). Once
// reported, the bucket is settled to its usage when the call ends; on a
// server stream, usage past the reservation is charged at the next message
// sent. It may be called many times and from any goroutine; amounts add
// up. It fails if ctx is not a rate-limited call's, the procedure does not
// charge the bucket, or tokens is negative or not finite.
func ReportUsage(ctx context.Context, bucketName string, tokens float64) error {
	c, ok := ctx.Value(callKey{}).(*call)
	if !ok {
		return errors.New("interceptor: ReportUsage: the context is not a rate-limited call's")
	}
	if math.IsNaN(tokens) || math.IsInf(tokens, 0) || tokens < 0 {
		return fmt.Errorf("interceptor: ReportUsage: tokens must be a finite number >= 0, got %v", tokens)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, ch := range c.reserved {
		if ch.Bucket == bucketName {
			c.reported[i] += tokens
			c.isReported[i] = true
			return nil
		}
	}
	return fmt.Errorf("interceptor: ReportUsage: procedure %s does not reserve from bucket %q", c.procedure, bucketName)
}
