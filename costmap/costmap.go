// Package costmap maps each Connect procedure to the token buckets it draws
// from and what one call costs, from the connectlimit.v1.limit method option
// and a configuration file that declares the buckets, concurrency limits and
// tiers.
//
// A procedure's rule comes from, in order: the configuration's procedures
// section, the method's connectlimit.v1.limit annotation, the configuration's
// default_bucket. A procedure with none of these is not limited.
//
// Costs are fixed numbers or CEL expressions: an estimate over the request,
// reserved before the handler runs, and the actual usage over the response,
// to which the reservation is settled. Expressions are compiled once, when
// the procedure is first resolved.
package costmap

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// Map resolves procedures to [Rule]s and identities to [Tier]s. It is
// immutable once built and safe for concurrent use.
type Map struct {
	cfg   Config
	tiers map[string]*Tier
	// anonymous is the tier of anonymous callers when the configuration
	// declares none: the default limits under the name "anonymous".
	anonymous *Tier
	// rules caches resolved procedures by name: *Rule, or nil for
	// unlimited ones.
	rules sync.Map
	// byMethod caches the same rules by method descriptor, so the lookup
	// made on every call does not build the procedure's name.
	byMethod sync.Map
}

// New builds a Map from a configuration and the services whose procedures
// it will be asked about. Every method of those services is resolved now, so
// an annotation naming an undeclared bucket, a cost above a bucket's
// capacity or an expression that does not compile fails here, with an error
// naming the procedure, instead of on the first call. When services are
// given, every procedure under the configuration's procedures must be a
// method of one of them, or be marked external, so that a misspelt name
// stops startup instead of silently limiting nothing. Procedures of other
// services are resolved on first use by [Map.Lookup].
func New(cfg Config, services ...protoreflect.ServiceDescriptor) (*Map, error) {
	tiers, err := cfg.tiers()
	if err != nil {
		return nil, err
	}
	base := tiers[""]
	m := &Map{cfg: cfg, tiers: tiers, anonymous: &Tier{Name: AnonymousTier, limits: base.limits, concurrency: base.concurrency}}
	known := map[string]bool{}
	for _, sd := range services {
		methods := sd.Methods()
		for i := range methods.Len() {
			known[Procedure(methods.Get(i))] = true
			if _, err := m.Lookup(methods.Get(i)); err != nil {
				return nil, err
			}
		}
	}
	if len(services) > 0 {
		for _, proc := range sortedKeys(cfg.Procedures) {
			if !known[proc] && !cfg.Procedures[proc].External {
				return nil, fmt.Errorf("costmap: procedures.%s names no method of the served services (%s): fix the name, or add external: true if another server's handlers serve it",
					proc, serviceNames(services))
			}
		}
	}
	// Configured procedures without expressions need no descriptor; check
	// them now too.
	for proc, pc := range cfg.Procedures {
		if _, done := m.rules.Load(proc); done || pc.hasExpressions() || pc.policyOnly() {
			continue
		}
		s := pc.spec()
		s.source = "procedures." + proc
		r, err := m.compile(proc, nil, s)
		if err != nil {
			return nil, err
		}
		m.rules.Store(proc, r)
	}
	return m, nil
}

func serviceNames(services []protoreflect.ServiceDescriptor) string {
	names := make([]string, len(services))
	for i, sd := range services {
		names[i] = string(sd.FullName())
	}
	return strings.Join(names, ", ")
}

// FailurePolicies returns, sorted and without repeats, the failure policies
// the configuration's procedures section names.
func (m *Map) FailurePolicies() []string {
	var policies []string
	for _, pc := range m.cfg.Procedures {
		if pc.FailurePolicy != "" && !slices.Contains(policies, pc.FailurePolicy) {
			policies = append(policies, pc.FailurePolicy)
		}
	}
	slices.Sort(policies)
	return policies
}

// Procedure returns the Connect procedure name of a method,
// "/package.Service/Method".
func Procedure(md protoreflect.MethodDescriptor) string {
	return "/" + string(md.Parent().FullName()) + "/" + string(md.Name())
}

// Lookup returns the rule for a method, or nil if calls to it are not
// limited. It fails only if the method's limit is invalid for this
// configuration (an undeclared bucket, a bad cost, an expression that does
// not compile), naming the procedure.
func (m *Map) Lookup(md protoreflect.MethodDescriptor) (*Rule, error) {
	if r, ok := m.byMethod.Load(md); ok {
		return r.(*Rule), nil //nolint:forcetypeassert // only *Rule is stored
	}
	proc := Procedure(md)
	r, ok := m.rules.Load(proc)
	if !ok {
		spec, limited := m.specFor(proc, md)
		var rule *Rule
		if limited {
			var err error
			if rule, err = m.compile(proc, md, spec); err != nil {
				return nil, err
			}
		}
		r, _ = m.rules.LoadOrStore(proc, rule)
	}
	m.byMethod.Store(md, r)
	return r.(*Rule), nil //nolint:forcetypeassert // only *Rule is stored
}

// LookupProcedure returns the rule for a procedure named
// "/package.Service/Method" when no descriptor is at hand. It knows the
// procedures already resolved, those of the configuration that use no
// expressions, and the default; it returns nil if none of them limits the
// procedure, and an error if the configuration's rule for it needs the
// descriptor to compile its expressions.
func (m *Map) LookupProcedure(procedure string) (*Rule, error) {
	if r, ok := m.rules.Load(procedure); ok {
		return r.(*Rule), nil //nolint:forcetypeassert // only *Rule is stored
	}
	if pc, ok := m.cfg.Procedures[procedure]; ok && (pc.hasExpressions() || pc.policyOnly()) {
		return nil, fmt.Errorf("costmap: procedure %s: %w", procedure, errNoDescriptor)
	}
	spec, ok := m.specFor(procedure, nil)
	if !ok {
		return nil, nil //nolint:nilnil // not limited
	}
	return m.compile(procedure, nil, spec)
}

// Tier returns the limits for an identity's tier. An empty tier means
// [AnonymousTier] for anonymous callers and the configuration's
// default_tier for others. A tier that is not declared is an error, except
// "anonymous", which then gets the default limits.
func (m *Map) Tier(tier string, anonymous bool) (*Tier, error) {
	if tier == "" {
		if anonymous {
			tier = AnonymousTier
		} else {
			tier = m.cfg.DefaultTier
		}
	}
	if t, ok := m.tiers[tier]; ok {
		return t, nil
	}
	if tier == AnonymousTier {
		return m.anonymous, nil
	}
	return nil, fmt.Errorf("costmap: tier %q is not declared under tiers: (declared: %s)", tier, strings.Join(sortedKeys(m.cfg.Tiers), ", "))
}

// spec is a procedure's limit, from the annotation or the configuration.
type spec struct {
	source      string // for errors: where the limit was declared
	charges     []chargeSpec
	concurrency string
	policy      string
}

type chargeSpec struct {
	// field is the charge's path under the spec's source: "" for the
	// bucket/cost shorthand, "charges[i]." for the others.
	field    string
	bucket   string
	cost     float64
	costSet  bool
	estimate string
	actual   string
}

func (pc ProcedureConfig) spec() spec {
	s := spec{concurrency: pc.Concurrency, policy: pc.FailurePolicy}
	// In the configuration, a cost of 0 means unset.
	if pc.Bucket != "" || (len(pc.Charges) == 0 && pc.Concurrency == "") {
		s.charges = append(s.charges, chargeSpec{bucket: pc.Bucket, cost: pc.Cost, costSet: pc.Cost != 0})
	}
	for i, c := range pc.Charges {
		s.charges = append(s.charges, chargeSpec{
			field: fmt.Sprintf("charges[%d].", i), bucket: c.Bucket, cost: c.Cost, costSet: c.Cost != 0,
			estimate: c.Estimate, actual: c.Actual,
		})
	}
	return s
}

// policyOnly reports whether the entry sets a failure policy and no limit.
func (pc ProcedureConfig) policyOnly() bool {
	return pc.FailurePolicy != "" && pc.Bucket == "" && pc.Cost == 0 && len(pc.Charges) == 0 && pc.Concurrency == ""
}

func (pc ProcedureConfig) hasExpressions() bool {
	for _, c := range pc.Charges {
		if c.Estimate != "" || c.Actual != "" {
			return true
		}
	}
	return false
}

// specFor finds a procedure's limit: configuration, annotation, default.
// An entry of procedures that sets only failure_policy keeps the limit of
// the annotation or default_bucket and changes only the policy.
func (m *Map) specFor(proc string, md protoreflect.MethodDescriptor) (spec, bool) {
	pc, configured := m.cfg.Procedures[proc]
	if configured && !pc.policyOnly() {
		s := pc.spec()
		s.source = "procedures." + proc
		return s, true
	}
	s, ok := m.inheritedSpec(md)
	if configured {
		if !ok {
			// Reported by compile: there is nothing to apply the policy to.
			return spec{source: "procedures." + proc, policy: pc.FailurePolicy}, true
		}
		s.policy = pc.FailurePolicy
	}
	return s, ok
}

// inheritedSpec is the limit a procedure has without a procedures entry:
// its annotation, else default_bucket.
func (m *Map) inheritedSpec(md protoreflect.MethodDescriptor) (spec, bool) {
	if md != nil {
		if opts := md.Options(); opts != nil && proto.HasExtension(opts, connectlimitv1.E_Limit) {
			if ann, ok := proto.GetExtension(opts, connectlimitv1.E_Limit).(*connectlimitv1.Limit); ok && ann != nil {
				return annotationSpec(ann), true
			}
		}
	}
	if m.cfg.DefaultBucket != "" {
		return spec{source: "default_bucket", charges: []chargeSpec{{bucket: m.cfg.DefaultBucket, cost: m.cfg.DefaultCost, costSet: m.cfg.DefaultCost != 0}}}, true
	}
	return spec{}, false
}

func annotationSpec(ann *connectlimitv1.Limit) spec {
	s := spec{source: "(connectlimit.v1.limit)", concurrency: ann.GetConcurrency()}
	if ann.Bucket != "" || ann.Cost != nil || (len(ann.GetCharges()) == 0 && ann.GetConcurrency() == "") {
		s.charges = append(s.charges, chargeSpec{bucket: ann.GetBucket(), cost: ann.GetCost(), costSet: ann.Cost != nil})
	}
	for i, c := range ann.GetCharges() {
		s.charges = append(s.charges, chargeSpec{
			field:  fmt.Sprintf("charges[%d].", i),
			bucket: c.GetBucket(), cost: c.GetCost(), costSet: c.Cost != nil,
			estimate: c.GetEstimate(), actual: c.GetActual(),
		})
	}
	return s
}

// compile validates a spec against the configuration and compiles its
// expressions. md may be nil when the spec has no expressions.
func (m *Map) compile(proc string, md protoreflect.MethodDescriptor, s spec) (*Rule, error) {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("costmap: procedure %s: %s", proc, fmt.Sprintf(format, args...))
	}
	r := &Rule{Procedure: proc, policy: s.policy, static: make(map[string][]bucket.Charge, len(m.tiers))}
	if len(s.charges) == 0 && s.concurrency == "" {
		if s.policy != "" {
			return nil, fail("%s sets only failure_policy, but the procedure has no annotation and no default_bucket applies: give it a bucket", s.source)
		}
		return nil, fail("%s declares no bucket and no concurrency limit", s.source)
	}
	seen := map[string]bool{}
	for _, c := range s.charges {
		field := s.source + "." + c.field
		if seen[c.bucket] {
			return nil, fail("%s charges bucket %q twice", s.source, c.bucket)
		}
		seen[c.bucket] = true
		if c.estimate != "" && c.costSet {
			return nil, fail("%sestimate is %q and %scost is %v; set one", field, c.estimate, field, c.cost)
		}
		cr := chargeRule{bucket: c.bucket, cost: 1}
		if c.costSet {
			if err := costError(field+"cost", c.cost); err != nil {
				return nil, fail("%s", strings.TrimPrefix(err.Error(), "costmap: "))
			}
			cr.cost = c.cost
		}
		if c.estimate != "" {
			cr.cost = 0 // evaluated per call
		}
		if err := checkStaticCost(m.tiers, field+"bucket", c.bucket, field+"cost", cr.cost); err != nil {
			return nil, fail("%s", strings.TrimPrefix(err.Error(), "costmap: "))
		}
		for _, e := range []struct {
			source, variable, variableField string
			dst                             **expr
			msg                             func() protoreflect.MessageDescriptor
		}{
			{c.estimate, "request", "estimate", &cr.estimate, func() protoreflect.MessageDescriptor { return md.Input() }},
			{c.actual, "response", "actual", &cr.actual, func() protoreflect.MessageDescriptor { return md.Output() }},
		} {
			if e.source == "" {
				continue
			}
			if md == nil {
				return nil, fail("%s%s: %v", field, e.variableField, errNoDescriptor)
			}
			compiled, err := compileExpr(e.source, e.variable, e.msg())
			if err != nil {
				return nil, fail("%s%s %q: %v", field, e.variableField, e.source, err)
			}
			*e.dst = compiled
		}
		if cr.actual != nil {
			r.metered = true
		}
		if cr.estimate != nil {
			r.estimated = true
		}
		r.charges = append(r.charges, cr)
	}
	if len(r.charges) > bucket.MaxCharges {
		return nil, fail("%s charges %d buckets, at most %d are allowed", s.source, len(r.charges), bucket.MaxCharges)
	}
	if s.concurrency != "" {
		if _, ok := m.tiers[""].concurrency[s.concurrency]; !ok {
			return nil, fail("%s.concurrency names limit %q, which is not declared under concurrency: (declared: %s)",
				s.source, s.concurrency, strings.Join(sortedKeys(m.tiers[""].concurrency), ", "))
		}
		r.concurrency = s.concurrency
	}
	for name, t := range m.tiers {
		charges := make([]bucket.Charge, len(r.charges))
		for i, c := range r.charges {
			charges[i] = bucket.Charge{Bucket: c.bucket, Limit: t.limits[c.bucket], Cost: c.cost}
		}
		r.static[name] = charges
	}
	return r, nil
}

// Rule is what calls to one procedure cost. It is immutable and safe for
// concurrent use.
type Rule struct {
	// Procedure is the procedure's name, "/package.Service/Method".
	Procedure   string
	charges     []chargeRule
	concurrency string
	policy      string // "" or one of the Policy constants
	estimated   bool   // some charge has an estimate expression
	metered     bool   // some charge has an actual expression
	// static holds, per tier, the charges with fixed costs filled in (and
	// estimated ones at 0), so calls without expressions allocate nothing.
	static map[string][]bucket.Charge
}

type chargeRule struct {
	bucket   string
	cost     float64
	estimate *expr
	actual   *expr
}

// Charges returns what one call costs in tier t, evaluating estimate
// expressions on req (a request message; for client and bidi streams, each
// received message). A failed evaluation returns an [*EvalError]. The
// returned slice is shared when the rule has no estimates: do not modify it.
func (r *Rule) Charges(t *Tier, req proto.Message) ([]bucket.Charge, error) {
	base := r.static[t.key]
	if !r.estimated {
		return base, nil
	}
	charges := append([]bucket.Charge(nil), base...)
	for i, c := range r.charges {
		if c.estimate == nil {
			continue
		}
		if req == nil {
			return nil, &EvalError{Procedure: r.Procedure, Bucket: c.bucket, Expression: c.estimate.source, Err: errors.New("no request message")}
		}
		cost, err := c.estimate.eval(req)
		if err != nil {
			return nil, &EvalError{Procedure: r.Procedure, Bucket: c.bucket, Expression: c.estimate.source, Err: err}
		}
		charges[i].Cost = cost
	}
	return charges, nil
}

// FailurePolicy returns the failure policy the configuration sets for this
// procedure ([PolicyOpen], [PolicyClosed] or [PolicyLocal]), or "" when it
// sets none and the interceptor's default applies.
func (r *Rule) FailurePolicy() string { return r.policy }

// NumCharges returns how many buckets a call draws from: zero for a
// procedure limited only by concurrency.
func (r *Rule) NumCharges() int { return len(r.charges) }

// Estimated reports whether some charge's cost is an expression over the
// request.
func (r *Rule) Estimated() bool { return r.estimated }

// EstimatedAt reports whether charge i (in the order of [Rule.Charges]) is
// priced by an estimate expression.
func (r *Rule) EstimatedAt(i int) bool { return r.charges[i].estimate != nil }

// Metered reports whether some charge is settled to an actual usage.
func (r *Rule) Metered() bool { return r.metered }

// MeteredAt reports whether charge i (in the order of [Rule.Charges]) is
// settled to an actual usage.
func (r *Rule) MeteredAt(i int) bool { return r.charges[i].actual != nil }

// AddActual evaluates the actual-usage expressions on resp, a response
// message, and adds each result to usage[i] for metered charge i. usage
// must have one element per charge. A failed evaluation returns an
// [*EvalError] and adds nothing.
func (r *Rule) AddActual(resp proto.Message, usage []float64) error {
	if !r.metered {
		return nil
	}
	var vals [bucket.MaxCharges]float64
	for i, c := range r.charges {
		if c.actual == nil {
			continue
		}
		v, err := c.actual.eval(resp)
		if err != nil {
			return &EvalError{Procedure: r.Procedure, Bucket: c.bucket, Expression: c.actual.source, Err: err}
		}
		vals[i] = v
	}
	for i := range r.charges {
		usage[i] += vals[i]
	}
	return nil
}

// Concurrency returns the concurrency limit of calls to this procedure in
// tier t, if any.
func (r *Rule) Concurrency(t *Tier) (Concurrency, bool) {
	if r.concurrency == "" {
		return Concurrency{}, false
	}
	return t.Concurrency(r.concurrency)
}
