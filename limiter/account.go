package limiter

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
)

// Call is one limited call's accounting, in the spirit of x/time/rate's
// Reservation: one value that owns the call's charges, knows what the store
// and the local store hold for it, and settles them when the call ends.
// [Limiter.Start] makes it; its methods are safe for concurrent use, as a
// stream's Receive and Send may run in two goroutines at once.
//
// Every request it sends to the store carries an ID derived from the
// call's: ".r" for the reservation, ".e<n>" for a stream's excess and
// ".m<n>" for a stream's messages, ".s" for the settlement. A request whose
// outcome is unknown (its reply was lost) is resent in the background as an
// adjustment with the same ID, which the store applies only if the first
// one was not: so the call counts it as held by the store, and the
// settlement, which charges the difference between what the call used and
// what the store holds, is exact either way.
type Call struct {
	ic         *Limiter
	procedure  string
	rule       *costmap.Rule
	tier       *costmap.Tier
	subject    string
	stream     StreamType
	perMessage bool // client and bidi streams: every received message is charged
	policy     FailurePolicy
	id         string
	lease      *lease

	mu sync.Mutex // handlers may call ReportUsage from any goroutine
	// charges has one entry per bucket of the rule, nil until the call
	// reserved (or, on a client or bidi stream, received a message).
	charges []charge
	// localHolds says that the local store holds part of a reservation,
	// to be settled there too.
	localHolds bool
	steps      int // IDs issued for excess takes and messages
	decision   *bucket.Decision
	// decisionIsLocal says that decision came from the local store, so
	// the store's answers must not be merged into it.
	decisionIsLocal bool
	actualFailed    bool // an actual expression failed: keep reservations
	settled         bool
	received        bool // a server stream received its request
	// job is the call's chain of background steps (resolutions of unknown
	// outcomes, then the settlement), applied in order; nil if none.
	job *job
}

// charge is one bucket of a call.
type charge struct {
	bucket.Charge // the bucket, its limit in the caller's tier, and the reserved cost
	estimated     bool
	metered       bool
	// inStore is what the store holds for this call: applied, or to be
	// applied by a queued resend.
	inStore float64
	// inLocal is what the local store holds for this call's reservation.
	inLocal float64
	// used is the usage counted from response messages, or on a client or
	// bidi stream the cost of every message allowed.
	used       float64
	reported   float64
	isReported bool
}

func newCall(i *Limiter, procedure string, stream StreamType, rule *costmap.Rule, tier *costmap.Tier, subject string) *Call {
	policy := i.cfg.policy
	if p := rule.FailurePolicy(); p != "" {
		policy, _ = ParseFailurePolicy(p) // costmap validated it
	}
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return &Call{
		ic: i, procedure: procedure, rule: rule, tier: tier, subject: subject, policy: policy,
		stream:     stream,
		perMessage: stream == ClientStream || stream == BidiStream,
		id:         base64.RawURLEncoding.EncodeToString(b[:]),
	}
}

// price evaluates the rule's costs for msg.
func (a *Call) price(msg proto.Message) ([]bucket.Charge, error) {
	charges, err := a.rule.Charges(a.tier, msg)
	if err == nil {
		return charges, nil
	}
	if evalErr := new(costmap.EvalError); errors.As(err, &evalErr) {
		e := newError(code.Code_INVALID_ARGUMENT,
			fmt.Sprintf("connectlimit: cannot price this request: bucket %q: cost expression %q: %v", evalErr.Bucket, evalErr.Expression, evalErr.Err))
		e.cause = err
		return nil, e
	}
	return nil, internalError("cannot price this request")
}

// initLocked makes the call's charges from the rule's, with no cost held.
func (a *Call) initLocked(costs []bucket.Charge) {
	if a.charges != nil {
		return
	}
	a.charges = make([]charge, len(costs))
	for i, c := range costs {
		a.charges[i] = charge{
			Charge:    bucket.Charge{Bucket: c.Bucket, Limit: c.Limit},
			estimated: a.rule.EstimatedAt(i),
			metered:   a.rule.MeteredAt(i),
		}
	}
}

// verdict is how one take for a call was decided.
type verdict struct {
	// decision is what the headers report: the store's, or the local
	// store's; nil when neither decided.
	decision *bucket.Decision
	local    bool // decision came from the local store
	// inStore says that the store holds the cost: it applied it, or may
	// have and a resend with the same ID will settle it once.
	inStore bool
	inLocal bool // the local store took the cost
	// err refuses the call (a denial, unavailable, cancelled); nil allows
	// it.
	err *Error
}

// decide takes costs for the call from the store under ID id and, when
// the store cannot decide, applies the call's failure policy. With resend,
// an unknown outcome is resent with the same ID (the store reports a
// duplicate if the first one was applied) until the store answers, says it
// cannot (not applied), or the call's wait for the store runs out.
func (a *Call) decide(ctx context.Context, costs []bucket.Charge, id, op string, resend bool) verdict {
	back := a.ic.back
	req := bucket.Request{Subject: a.subject, Charges: costs, ID: id, IDWindow: a.ic.idWindow}
	d, err := back.take(ctx, req)
	unknown := bucket.MayHaveApplied(err)
	if unknown && resend {
		// A timeout may be a slow store, or a busy process that read the
		// reply late: ask again, with the same ID, while the call's wait
		// allows, rather than decide without the store. The store stops
		// this early when it is known to be down (the breaker opens).
		deadline := time.Now().Add(back.wait)
		for ctx.Err() == nil && time.Now().Before(deadline) {
			d2, err2 := back.take(ctx, req)
			if err2 == nil {
				d, err, unknown = d2, nil, false
				break
			}
			if !bucket.MayHaveApplied(err2) {
				break // the first request's outcome stays unknown
			}
			err = err2
		}
	}
	if err == nil {
		if !d.Allowed {
			return verdict{decision: &d, err: Denial(a.subject, d)}
		}
		return verdict{decision: &d, inStore: true}
	}
	if errors.Is(err, bucket.ErrInvalidRequest) {
		a.ic.cfg.logger.ErrorContext(ctx, "connectlimit: store refused a request as invalid", "op", op, "procedure", a.procedure, "subject", a.subject, "error", err)
		return verdict{err: internalError("cannot charge this call")}
	}
	if unknown {
		// Resolve it exactly once: an adjustment with the same ID charges
		// the cost only if the lost request was not applied.
		a.follow(ctx, bucket.Request{Subject: a.subject, Charges: costs, Mode: bucket.ModeAdjust, ID: id, IDWindow: a.ic.idWindow}, err)
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		// The caller went away; that is not the store's fault.
		return verdict{inStore: unknown, err: contextError(ctxErr)}
	}
	back.log.storeFailed(ctx, op, a.procedure, a.subject, a.policy, err)
	switch a.policy {
	case FailOpen:
		back.allowedWithoutStore.Add(1)
		return verdict{inStore: unknown}
	case FailClosed:
		back.rejectedUnavailable.Add(1)
		return verdict{inStore: unknown, err: unavailableError()}
	default:
		ld, lerr := back.takeLocal(ctx, req)
		if lerr != nil {
			return verdict{inStore: unknown, err: contextError(lerr)}
		}
		back.localDecisions.Add(1)
		if !ld.Allowed {
			return verdict{decision: &ld, local: true, inStore: unknown, err: Denial(a.subject, ld)}
		}
		return verdict{decision: &ld, local: true, inStore: unknown, inLocal: true}
	}
}

// follow queues req in the call's chain of background steps, after those
// already queued.
func (a *Call) follow(ctx context.Context, req bucket.Request, cause error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.followLocked(ctx, req, cause)
}

func (a *Call) followLocked(ctx context.Context, req bucket.Request, cause error) {
	if a.job == nil {
		a.job = a.ic.settler.newJob(a.procedure)
	}
	a.ic.settler.push(ctx, a.job, step{req: req}, cause)
}

// setDecisionLocked records the decision to report in headers.
func (a *Call) setDecisionLocked(v verdict) {
	if v.decision == nil {
		return
	}
	switch {
	case a.decision == nil || v.local != a.decisionIsLocal:
		a.decision, a.decisionIsLocal = v.decision, v.local
	default:
		a.decision = merge(a.decision, *v.decision)
	}
}

// reserve takes the call's cost from every bucket at once. It returns the
// error that refuses the call: a denial, a pricing error, or unavailable.
func (a *Call) reserve(ctx context.Context, msg proto.Message) error {
	if a.rule.NumCharges() == 0 {
		return nil // limited only by concurrency
	}
	costs, err := a.price(msg)
	if err != nil {
		return err
	}
	v := a.decide(ctx, costs, a.id+".r", "reserve", true)
	a.mu.Lock()
	a.initLocked(costs)
	for i, c := range costs {
		a.charges[i].Cost = c.Cost
		if v.inStore {
			a.charges[i].inStore = c.Cost
		}
		if v.inLocal {
			a.charges[i].inLocal = c.Cost
			a.localHolds = true
		}
	}
	a.setDecisionLocked(v)
	a.mu.Unlock()
	if v.err != nil {
		// The call never runs: give back whatever is held.
		a.settle(ctx, endRejected)
		return v.err
	}
	return nil
}

// chargeMessage charges one received message of a client or bidi stream.
func (a *Call) chargeMessage(ctx context.Context, msg proto.Message) error {
	costs, err := a.price(msg)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.steps++
	id := a.id + ".m" + strconv.Itoa(a.steps)
	a.mu.Unlock()
	v := a.decide(ctx, costs, id, "charge message", false)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.initLocked(costs)
	for i, c := range costs {
		if v.inStore {
			a.charges[i].inStore += c.Cost
		}
		if v.err == nil {
			a.charges[i].used += c.Cost
		}
	}
	a.setDecisionLocked(v)
	if v.err != nil {
		return v.err
	}
	return nil
}

// addActual counts the actual usage one response message reports. An
// expression that fails is logged, and the call then keeps its reservation.
func (a *Call) addActual(ctx context.Context, msg proto.Message) {
	if !a.rule.Metered() {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.charges == nil {
		return
	}
	var used [bucket.MaxCharges]float64
	if err := a.rule.AddActual(msg, used[:len(a.charges)]); err != nil {
		a.actualFailed = true
		a.ic.cfg.logger.WarnContext(ctx, "connectlimit: cannot read actual usage; keeping the reservation",
			"procedure", a.procedure, "subject", a.subject, "error", err)
		return
	}
	for i := range a.charges {
		a.charges[i].used = math.Min(a.charges[i].used+used[i], bucket.MaxTokens)
	}
}

// meteredLocked reports whether charge i is settled to its usage.
func (a *Call) meteredLocked(i int) bool {
	c := &a.charges[i]
	return c.isReported || (c.metered && !a.actualFailed)
}

// usedLocked is the usage counted for charge i so far.
func (a *Call) usedLocked(i int) float64 {
	c := &a.charges[i]
	used := c.reported
	if c.metered && !a.actualFailed {
		used += c.used
	}
	return math.Min(used, bucket.MaxTokens)
}

// ending says how a call ended, for its settlement.
type ending uint8

const (
	endOK       ending = iota // the handler returned normally
	endFailed                 // the handler returned an error
	endRejected               // the call never ran: the interceptor refused it
)

// finalLocked is what charge i finally costs.
func (a *Call) finalLocked(i int, end ending) float64 {
	c := &a.charges[i]
	switch {
	case end == endRejected:
		return 0
	case a.perMessage:
		return c.used
	case a.meteredLocked(i):
		return a.usedLocked(i)
	case end == endFailed && c.estimated:
		return 0
	default:
		return c.Cost
	}
}

// settle applies the difference between what the call finally costs and
// what the store (and the local store) hold for it, and returns the
// decision to report in headers. It runs once; later calls return the
// same decision.
//
// The settlement goes out at once, with the call's ID. If the call has
// background steps still queued (an unknown outcome being resolved), it is
// queued after them, since a refund applied before the charge it refunds
// could be lost to the capacity cap. If it certainly did not reach the
// store, it is merged into the caller's pending balance; if its outcome is
// unknown, it is resent with the same ID.
func (a *Call) settle(ctx context.Context, end ending) *bucket.Decision {
	a.mu.Lock()
	if a.settled || a.charges == nil {
		d := a.decision
		a.settled = true
		a.mu.Unlock()
		return d
	}
	a.settled = true
	var remote, local []bucket.Charge
	for i := range a.charges {
		c := &a.charges[i]
		final := a.finalLocked(i, end)
		if delta := final - c.inStore; delta != 0 {
			remote = append(remote, bucket.Charge{Bucket: c.Bucket, Limit: c.Limit, Cost: delta})
		}
		if a.localHolds {
			if delta := final - c.inLocal; delta != 0 {
				local = append(local, bucket.Charge{Bucket: c.Bucket, Limit: c.Limit, Cost: delta})
			}
		}
	}
	base, baseIsLocal := a.decision, a.decisionIsLocal
	if len(remote) == 0 && len(local) == 0 {
		// The call cost what it reserved, the common case: nothing to
		// send, and nothing (not even the settlement's ID) to build.
		a.mu.Unlock()
		return base
	}
	req := bucket.Request{Subject: a.subject, Charges: remote, Mode: bucket.ModeAdjust, ID: a.id + ".s", IDWindow: a.ic.idWindow}
	queued := len(remote) > 0 && a.job != nil
	if queued {
		a.followLocked(ctx, req, errors.New("settled after the call's unresolved store requests"))
	}
	a.mu.Unlock()
	ctx = context.WithoutCancel(ctx) // a caller that went away is still owed its refund
	if len(local) > 0 {
		if _, err := a.ic.back.takeLocal(ctx, bucket.Request{Subject: a.subject, Charges: local, Mode: bucket.ModeAdjust}); err != nil {
			a.ic.cfg.logger.WarnContext(ctx, "connectlimit: cannot settle in the local store", "procedure", a.procedure, "subject", a.subject, "error", err)
		}
	}
	if len(remote) == 0 || queued {
		return base
	}
	d, err := a.ic.back.take(ctx, req)
	switch {
	case err == nil:
		if base == nil || baseIsLocal {
			return base
		}
		return merge(base, d)
	case bucket.MayHaveApplied(err):
		a.ic.settler.push(ctx, a.ic.settler.newJob(a.procedure), step{req: req}, err)
	default:
		a.ic.settler.owe(ctx, a.procedure, req, err)
	}
	return base
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

// chargeExcess takes, on a server stream, the usage counted beyond what the
// store holds. It returns the error that ends the stream, if any.
func (a *Call) chargeExcess(ctx context.Context) error {
	a.mu.Lock()
	var excess []bucket.Charge
	var idx []int
	total := 0.0
	for i := range a.charges {
		if !a.meteredLocked(i) {
			continue
		}
		if need := a.usedLocked(i) - math.Max(a.charges[i].inStore, a.charges[i].Cost); need > 0 {
			excess = append(excess, bucket.Charge{Bucket: a.charges[i].Bucket, Limit: a.charges[i].Limit, Cost: need})
			idx = append(idx, i)
			total += need
		}
	}
	if len(excess) == 0 {
		a.mu.Unlock()
		return nil
	}
	a.steps++
	id := a.id + ".e" + strconv.Itoa(a.steps)
	a.mu.Unlock()
	v := a.decide(ctx, excess, id, "charge stream excess", false)
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, i := range idx {
		if v.inStore {
			a.charges[i].inStore += excess[k].Cost
		}
		if v.err == nil {
			// The reservation grows by the excess, whoever holds it.
			a.charges[i].Cost += excess[k].Cost
		}
		if v.inLocal {
			a.charges[i].inLocal += excess[k].Cost
			a.localHolds = true
		}
	}
	a.setDecisionLocked(v)
	if v.err == nil {
		return nil
	}
	if v.err.Code == code.Code_RESOURCE_EXHAUSTED &&
		total <= a.ic.cfg.overdraft && v.decision != nil && !v.decision.OverCapacity() {
		return nil // within the overdraft: settled into debt at the end
	}
	return v.err
}

// currentDecision returns the latest decision, for headers.
func (a *Call) currentDecision() *bucket.Decision {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.decision
}

type callKey struct{}

func withCall(ctx context.Context, a *Call) context.Context {
	return context.WithValue(ctx, callKey{}, a)
}

// ReportUsage records, from inside a handler, that the current call used
// tokens from a bucket its procedure charges, for costs the response does
// not carry (or in addition to what its actual expression reads). Once
// reported, the bucket is settled to its usage when the call ends; on a
// server stream, usage past the reservation is charged at the next message
// sent. It may be called many times and from any goroutine; amounts add
// up. It fails if ctx is not a rate-limited call's, the procedure does not
// charge the bucket, or tokens is negative, not finite, or would take the
// call's total past [bucket.MaxTokens].
func ReportUsage(ctx context.Context, bucketName string, tokens float64) error {
	a, ok := ctx.Value(callKey{}).(*Call)
	if !ok {
		return errors.New("limiter: ReportUsage: the context is not a rate-limited call's")
	}
	if !(tokens >= 0 && tokens <= bucket.MaxTokens) {
		return fmt.Errorf("limiter: ReportUsage: tokens must be a number from 0 to %g, got %v", bucket.MaxTokens, tokens)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range a.charges {
		c := &a.charges[i]
		if c.Bucket != bucketName {
			continue
		}
		if c.reported+tokens > bucket.MaxTokens {
			return fmt.Errorf("limiter: ReportUsage: bucket %q: %v more tokens would take the call's reported total past %g", bucketName, tokens, bucket.MaxTokens)
		}
		c.reported += tokens
		c.isReported = true
		return nil
	}
	return fmt.Errorf("limiter: ReportUsage: procedure %s does not reserve from bucket %q", a.procedure, bucketName)
}

// Reserve takes the call's cost from every bucket at once, priced on msg:
// the request of a unary call or of a server stream, or nil when the rule
// needs none (see [Call.ReservesOnStart]). It returns the *[Error] that
// refuses the call (a denial, a pricing error, unavailable), which has
// then been settled to nothing; the caller still calls [Call.End].
func (a *Call) Reserve(ctx context.Context, msg proto.Message) error {
	return a.reserve(ctx, msg)
}

// ReservesOnStart reports whether a stream's cost must be reserved before
// its handler runs, with no request message (the cost needs none), rather
// than when its first message arrives ([Call.Received]). Unary calls always
// reserve on their request.
func (a *Call) ReservesOnStart() bool {
	return !a.perMessage && !a.rule.Estimated()
}

// Received records a message a stream received: on a client or bidi stream
// it charges the message its cost; on a server stream whose cost is
// estimated from the request, the first message reserves it. It returns the
// *[Error] that ends the stream, if any.
func (a *Call) Received(ctx context.Context, msg proto.Message) error {
	switch {
	case a.perMessage:
		return a.chargeMessage(ctx, msg)
	case a.rule.Estimated() && !a.reserveSeen():
		return a.reserve(ctx, msg)
	}
	return nil
}

// reserveSeen reports whether the call reserved (or tried to), and marks
// it so.
func (a *Call) reserveSeen() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	seen := a.received
	a.received = true
	return seen
}

// Sent records a message the call sent: its actual usage is counted and, on
// a server stream, usage beyond the reservation is charged at once. It
// returns the *[Error] that ends the stream, if any: the message was sent,
// and the stream must end after it.
func (a *Call) Sent(ctx context.Context, msg proto.Message) error {
	if a.perMessage {
		return nil
	}
	if msg != nil {
		a.addActual(ctx, msg)
	}
	if a.stream == Unary {
		return nil // settled when the call ends
	}
	return a.chargeExcess(ctx)
}

// End settles the call, once its handler has returned, and releases its
// concurrency slot. failed says that the handler returned an error of its
// own (not one of the limiter's, which settle the call as they happen). It
// returns the decision to report in headers, nil if none. It may be called
// more than once; later calls return the same decision.
func (a *Call) End(ctx context.Context, failed bool) *bucket.Decision {
	end := endOK
	if failed {
		end = endFailed
	}
	d := a.settle(ctx, end)
	a.releaseLease(ctx)
	return d
}

// Decision returns the latest decision, for headers: the reservation, or
// the last message's charge; nil if none.
func (a *Call) Decision() *bucket.Decision { return a.currentDecision() }

// Context returns ctx carrying the call, so that the handler can call
// [ReportUsage].
func (a *Call) Context(ctx context.Context) context.Context { return withCall(ctx, a) }
